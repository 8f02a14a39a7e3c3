"""Curation pipeline: mask NMS against a brute-force loop, and the per-image cost outside model forwards.

NMS: random 640x480 masks (ellipses and rectangles, a third of them jittered near-copies of
another so that suppression happens); ``pipeline.nms.nms_keep`` (IoU of each block of 256 candidates
against the masks kept so far and within the block; never an n x n matrix) against the loop most NMS code writes (one ``pycocotools.mask.iou``
call per candidate against the masks kept so far). Both must keep the same set.

Overhead: the annotation path on the COCO val2017 sample (``../shared/data``) or, when absent, the
synthetic dataset, step by step in one process (read + probe + polygon->RLE, the RGB decode every
model stage does, NMS, record JSON round trips between stages, sample validation + shard write),
then the whole job on a local Ray (already started, so Ray start-up is not counted).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
COCO = Path(os.environ.get("USE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "coco2017_val_subset"


def random_masks(n: int, h: int = 480, w: int = 640, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    from shards import rle as rle_utils

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    rles, shapes = [], []
    for _ in range(n):
        if shapes and rng.random() < 0.33:  # a near-duplicate of an earlier mask
            cx, cy, rx, ry, ell = shapes[rng.integers(len(shapes))]
            cx, cy = cx + rng.integers(-4, 5), cy + rng.integers(-4, 5)
        else:
            cx, cy = rng.integers(0, w), rng.integers(0, h)
            rx, ry, ell = rng.integers(8, 120), rng.integers(8, 120), rng.random() < 0.5
        shapes.append((cx, cy, rx, ry, ell))
        if ell:
            m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        else:
            m = (abs(xx - cx) <= rx) & (abs(yy - cy) <= ry)
        rles.append(rle_utils.encode_one(m))
        del m
    return rles, rng.random(n)


def brute_force_keep(rles: list[dict], scores: np.ndarray, threshold: float) -> list[int]:
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if not kept or np.max(mask_utils.iou([coco[i]], [coco[k] for k in kept], [0] * len(kept))) <= threshold:
            kept.append(int(i))
    return kept


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_nms() -> list[str]:
    from pipeline.nms import nms_keep

    rows = ["| masks | kept | `nms_keep` (s) | brute-force loop (s) | speed-up |", "|---:|---:|---:|---:|---:|"]
    for n in (100, 500, 2000):
        rles, scores = random_masks(n)
        repeat = 3 if n < 2000 else 1
        t_fast, (keep, _) = _best(lambda r=rles, s=scores: nms_keep(r, s, 0.8), repeat)
        t_slow, ref = _best(lambda r=rles, s=scores: brute_force_keep(r, s, 0.8), repeat)
        assert list(keep) == ref, f"keep sets differ at {n} masks"
        rows.append(f"| {n} | {len(ref)} | {t_fast:.3f} | {t_slow:.3f} | {t_slow / t_fast:.1f}x |")
    return rows


def _sample_source(tmp: Path):
    from pipeline.config import SourceConfig

    if COCO.is_dir():
        cfg = SourceConfig(kind="coco", images=str(COCO / "val2017"),
                           annotations=str(COCO / "annotations" / "instances_val2017.json"),
                           captions=str(COCO / "annotations" / "captions_val2017.json"))
        return "COCO val2017 sample (40 images, 292 instances)", cfg
    from pipeline import synth

    d = synth.generate(tmp / "synth", 40, seed=0)
    cfg = SourceConfig(kind="coco", name="synth", images=str(d / "images"), annotations=str(d / "instances.json"),
                       captions=str(d / "captions.json"))
    return "synthetic dataset (40 images)", cfg


def bench_overhead(tmp: Path) -> list[str]:
    import shards
    from pipeline.images import decode
    from pipeline.job import finalize_batch
    from pipeline.record import Record
    from pipeline.sources import make_source, read_item
    from shards.schema import SampleMeta

    name, src_cfg = _sample_source(tmp)
    items = list(make_source(src_cfg).plan())
    n = len(items)
    steps: dict[str, float] = {}

    t = time.perf_counter()
    rows = [read_item(it, min_side=16, max_pixels=1 << 28, verify="draft") for it in items]
    steps["read + probe (draft decode) + COCO polygons -> RLE"] = time.perf_counter() - t
    t = time.perf_counter()
    for r in rows:
        decode(r["image"])
    steps["RGB decode as a model stage does it (`pipeline.images.decode`)"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(4):  # the record crosses 4 stage boundaries on the full model path
        rows = [{**r, "record": Record.from_json(r["record"]).to_json()} for r in rows]
    steps["record JSON round trips (x4 stage boundaries)"] = time.perf_counter() - t
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in ("key", "image", "record")}
    t = time.perf_counter()
    out = finalize_batch(batch, nms=True, iou_threshold=0.8, min_segments=1)
    steps["mask NMS + segment ids"] = time.perf_counter() - t
    writer_cls = shards.ShardWriter  # import it (webdataset pulls in torch, seconds) outside the timing
    t = time.perf_counter()
    with writer_cls(tmp / "shards", max_samples=16) as w:
        for key, image, rec in zip(out["key"], out["image"], out["record"], strict=True):
            r = Record.from_json(rec)
            meta = SampleMeta.from_dict({"schema_version": 1, "key": key, "image_id": r.image_id, "source": r.source,
                                         "width": r.width, "height": r.height, "image_ext": r.image_ext,
                                         "file_name": r.file_name, "captions": r.captions, "segments": r.segments})
            w.write(meta, image)
    steps["sample validation + shard write (fsync per shard)"] = time.perf_counter() - t
    total = sum(steps.values())
    lines = [f"Per image, {name}, one process:", "",
             "| step | ms / image |", "|---|---:|"]
    lines += [f"| {k} | {v / n * 1000:.2f} |" for k, v in steps.items()]
    lines += [f"| **total outside model forwards** | **{total / n * 1000:.2f}** |", ""]
    lines += _bench_job(src_cfg, tmp, n)
    return lines


def _bench_job(src_cfg, tmp: Path, n: int) -> list[str]:
    import logging

    import ray

    from pipeline.config import JobConfig
    from pipeline.job import run_job

    cfg = JobConfig(source=src_cfg, shards={"max_samples": 16})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    try:
        times = []
        for i in range(2):  # the first run also pays for worker start-up and imports
            t = time.perf_counter()
            run_job(cfg, tmp / f"job{i}", progress=False)
            times.append(time.perf_counter() - t)
    finally:
        ray.shutdown()
    return [f"Whole annotation-path job on a local Ray ({os.cpu_count()} CPUs, Ray already started): "
            f"first run {times[0]:.1f} s ({n / times[0]:.1f} images/s, includes worker start-up), "
            f"second run {times[1]:.1f} s ({n / times[1]:.1f} images/s)."]


def run() -> str:
    with tempfile.TemporaryDirectory() as d:
        nms_rows = bench_nms()
        overhead = bench_overhead(Path(d))
    return "\n".join([
        "## Curation pipeline (`benchmarks/bench_pipeline.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_pipeline`).", "",
        "Mask NMS on 640x480 RLE masks at IoU 0.8 (a third are near-duplicates); both keep the same set "
        "(asserted). Baseline: the usual loop, one `pycocotools.mask.iou` call per candidate against the "
        "masks kept so far.", "", *nms_rows, "",
        "Overhead of the pipeline outside model forwards:", "", *overhead, "",
        "NMS times are the best of 3 runs (1 run at 2000 masks); the machine may be shared, so compare "
        "ratios within this section rather than absolute times across runs.",
    ])
