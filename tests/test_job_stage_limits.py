"""The job hands each model stage the read step's pixel limit, so no stage refuses an image the
read step accepted (and a tighter limit is enforced by the stages' decoder too)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from job_helpers import write_coco

import shards
from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.record import Record
from pipeline.stages.common import decode_pending
from shards.image import ReadPolicy


@pytest.mark.slow
def test_stages_get_read_max_pixels(tmp_path, ray_local):
    paths = write_coco(tmp_path / "data", {f"im{i}.png": (24, 20) for i in range(3)})
    cfg = load_config("pipeline/configs/demo.yaml", [
        f"source.images={paths['images']}", f"source.annotations={paths['annotations']}",
        "impl.captioner=job_probes:ConfigProbe", "captioner.enabled=true", "read.max_pixels=123456", "read.min_side=8"])
    assert run_job(cfg, tmp_path / "out", progress=False)["written"] == 3
    for s in shards.iter_samples(tmp_path / "out"):
        dumps = [json.loads(c.text) for c in s.meta.captions if c.source == "probe"]
        assert [(d["read"]["max_pixels"], d["read"]["min_side"]) for d in dumps] == [(123456, 8)]


def test_decode_pending_applies_the_limit():
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    batch = {"image": np.array([buf.getvalue(), buf.getvalue()], dtype=object)}
    records = [Record(source="t", image_id="a"), Record(source="t", image_id="b")]
    assert [i for i, _ in decode_pending(batch, records, "captioner", policy=ReadPolicy(max_pixels=40 * 30))] == [0, 1]
    records = [Record(source="t", image_id="a"), Record(source="t", image_id="b")]
    assert list(decode_pending(batch, records, "captioner", policy=ReadPolicy(max_pixels=40 * 30 - 1))) == []
    assert all(r.failure.stage == "captioner" and "decompression-bomb" in r.failure.error for r in records)
