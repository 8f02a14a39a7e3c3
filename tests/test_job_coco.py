"""The annotation path on real COCO val2017 images: 40 in, 40 samples out, masks equal annToMask."""

from __future__ import annotations

import json

import numpy as np
import pytest

import shards
from pipeline.config import load_config
from pipeline.job import run_job
from shards import rle as rle_utils


@pytest.mark.slow
def test_coco_annotation_path_writes_every_instance(shared_data, tmp_path, ray_local):
    from pycocotools.coco import COCO

    root = shared_data / "coco2017_val_subset"
    inst = root / "annotations" / "instances_val2017.json"
    cfg = load_config("pipeline/configs/coco-annotations.yaml", [
        f"source.images={root / 'val2017'}", f"source.annotations={inst}",
        f"source.captions={root / 'annotations' / 'captions_val2017.json'}", "shards.max_samples=16"])
    summary = run_job(cfg, tmp_path, progress=False)
    assert (summary["images_in"], summary["written"], summary["failed"]) == (40, 40, 0)
    assert summary["shards"] == 3 and summary["segments"] == 290  # 292 instances, 2 of them iscrowd (skipped)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert shards.read_manifest(tmp_path).num_rows == 40 and shards.read_failures(tmp_path).num_rows == 0

    coco = COCO(str(inst))
    samples = list(shards.iter_samples(tmp_path))
    assert len(samples) == 40
    for s in samples:
        image_id = int(s.meta.image_id)
        info = coco.imgs[image_id]
        assert (s.meta.width, s.meta.height) == (info["width"], info["height"])
        assert s.image_bytes == (root / "val2017" / info["file_name"]).read_bytes()  # original bytes
        assert len(s.meta.captions) == 5
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        assert len(s.meta.segments) == len(anns)
        for seg, ann in zip(s.meta.segments, anns, strict=True):
            assert np.array_equal(rle_utils.decode(seg.rle), coco.annToMask(ann).astype(bool))
            assert coco.cats[ann["category_id"]]["name"] in {t.text for t in seg.texts}
