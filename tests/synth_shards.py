"""Shards of the synthetic dataset, made by the curation job's own code without Ray (test data only).

The functions the job maps over its Ray dataset, called in this process, in the job's order with the
job's default settings: the COCO source plans the items (``pipeline.job.plan_items``), ``read_batch``
reads and checks each image once and turns its annotations into segments, ``finalize_batch`` runs
mask NMS and the min-segments check, and ``Record.to_sample_meta`` gives the samples that
``shards.ShardWriter`` commits. So the trainer and shard-tool tests train on and read the shards
the pipeline makes, not a second implementation of them; only Ray's scheduling is left out (the
``test_job_*`` tests run the job on Ray). An image that fails on the way is an error here: the
fixtures promise every requested image as a sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import shards
from pipeline.config import JobConfig
from pipeline.job import finalize_batch, plan_items, read_batch
from pipeline.record import records_of

SOURCE = "synth"


def write_synth_shards(synth_dir: Path, out_dir: Path, image_ids: list[int] | None = None,
                       max_samples: int = 8) -> Path:
    """Shards ``synth-*.tar`` of ``max_samples`` samples each (and the manifest) in ``out_dir``."""
    cfg = JobConfig.model_validate({"source": {
        "kind": "coco", "name": SOURCE, "images": str(synth_dir / "images"),
        "annotations": str(synth_dir / "instances.json"), "captions": str(synth_dir / "captions.json")}})
    items = plan_items(cfg)
    if image_ids is not None:
        wanted = {shards.make_key(SOURCE, i) for i in image_ids}
        items = [it for it in items if it["key"] in wanted]
    r = cfg.read
    rows = read_batch(_columns(items), min_side=r.min_side, max_pixels=r.max_pixels, verify=r.verify,
                      max_bytes=r.max_bytes, follow_symlinks_outside=r.follow_symlinks_outside, exif=r.exif)
    rows = finalize_batch(rows, nms=cfg.nms.enabled, iou_threshold=cfg.nms.iou_threshold,
                          min_segments=cfg.shards.min_segments)
    records = records_of(rows)
    for key, rec in zip(rows["key"], records, strict=True):
        if rec.failure is not None:
            raise RuntimeError(f"synthetic image {key} failed at {rec.failure.stage}: {rec.failure.error}")
    with shards.ShardWriter(out_dir, prefix=SOURCE, max_samples=max_samples) as writer:
        for key, image, rec in zip(rows["key"], rows["image"], records, strict=True):
            writer.write(rec.to_sample_meta(str(key)), bytes(image))
    shards.build_manifest(out_dir)
    return out_dir


def _columns(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Planned items as a Ray Data numpy batch (one object column per field)."""
    names = sorted({k for it in items for k in it})
    out = {}
    for name in names:
        col = np.empty(len(items), dtype=object)
        col[:] = [it.get(name) for it in items]
        out[name] = col
    return out
