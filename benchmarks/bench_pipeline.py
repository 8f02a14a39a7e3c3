"""Curation pipeline: mask NMS against the textbook loop, and the per-image cost outside model forwards.

NMS (``nms-100/500/2000``): random 640x480 masks (ellipses and rectangles, a third of them jittered
near-copies of another so that suppression happens); ``pipeline.nms.nms_keep`` (exact IoU only for
pairs whose area/box bound can pass the threshold) against the loop most NMS code writes, one
``pycocotools.mask.iou`` call per candidate against every mask kept so far. Both must keep the same
set (asserted). A cProfile of ``nms_keep`` at the largest size goes into the Markdown, so where the
remaining time goes is part of the record.

Overhead (``pipeline-overhead``): the annotation path on the COCO val2017 sample (``../shared/data``)
or, when absent, the synthetic dataset, step by step in one process (read + probe + polygon->RLE,
the RGB decode every model stage does, NMS, record JSON round trips between stages, sample
validation + shard write), against a budget of 50 ms per image; then the whole job on a local Ray
(already started, so Ray start-up is not counted).
"""

from __future__ import annotations

import importlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from benchmarks.common import Entry, Section, compare, entry_table, machine, profile_table

ROOT = Path(__file__).resolve().parents[1]
COCO = Path(os.environ.get("USE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "coco2017_val_subset"
NMS_SIZES = ((100, 7), (500, 5), (2000, 3))  # (masks, repeats)
NMS_THRESHOLD = 0.8
OVERHEAD_BUDGET_MS = 50.0
OVERHEAD_REPEATS = 3


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
    """The baseline: candidates by descending score, one pycocotools call against all kept so far."""
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        if not kept or np.max(mask_utils.iou([coco[i]], [coco[k] for k in kept], [0] * len(kept))) <= threshold:
            kept.append(int(i))
    return kept


def bench_nms() -> tuple[list[Entry], list[str]]:
    from pipeline.nms import _bound_pairs, nms_keep
    from shards import rle as rle_utils

    entries, rows = [], ["| masks | kept | pairs | pairs past the bound | `nms_keep` (s) | loop (s) | speed-up |",
                         "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, repeat in NMS_SIZES:
        rles, scores = random_masks(n)
        base, ours = compare(lambda r=rles, s=scores: brute_force_keep(r, s, NMS_THRESHOLD),
                             lambda r=rles, s=scores: nms_keep(r, s, NMS_THRESHOLD), repeat=repeat,
                             warmup=1 if n <= 500 else 0)
        keep = list(ours.result[0])
        assert keep == base.result, f"keep sets differ at {n} masks"
        pairs = len(_bound_pairs(rle_utils.bbox(rles), rle_utils.area(rles), NMS_THRESHOLD, 256)[0])
        e = Entry.cost(f"nms-{n}", base.median, ours.median, "s", 10.0 if n >= 500 else None,
                       f"{n} masks 640x480, IoU {NMS_THRESHOLD}, same {len(keep)} kept (asserted); exact IoU for "
                       f"{pairs} of {n * (n - 1) // 2} pairs; ours {ours.spread()}, loop {base.spread()}")
        entries.append(e)
        rows.append(f"| {n} | {len(keep)} | {n * (n - 1) // 2} | {pairs} | {ours.median:.4f} | {base.median:.3f} | "
                    f"{e.ratio:.1f}x |")
        if n == NMS_SIZES[-1][0]:
            profile = [f"Where the time of `nms_keep` on {n} masks goes:", "",
                       *profile_table(nms_keep, rles, scores, NMS_THRESHOLD)]
    return entries, [*rows, "", *profile]


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


def stage_decoder():
    """The RGB decode every model stage runs: the shared decoder (``shards.image``) once it exists."""
    try:
        return importlib.import_module("shards.image").decode_rgb_array, "`shards.image.decode_rgb_array`"
    except ImportError:
        return importlib.import_module("pipeline.images").decode, "`pipeline.images.decode`"


def _overhead_once(src_cfg, tmp: Path) -> tuple[dict[str, float], int]:
    import shards
    from pipeline.job import finalize_batch
    from pipeline.record import Record
    from pipeline.sources import make_source, read_item

    decode, decode_name = stage_decoder()
    items = list(make_source(src_cfg).plan())
    steps: dict[str, float] = {}
    t = time.perf_counter()
    rows = [read_item(it, min_side=16, max_pixels=1 << 28, verify="draft") for it in items]
    steps["read + probe (draft decode) + COCO polygons -> RLE"] = time.perf_counter() - t
    t = time.perf_counter()
    for r in rows:
        decode(r["image"])
    steps[f"RGB decode as a model stage does it ({decode_name})"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(4):  # the record crosses 4 stage boundaries on the full model path
        rows = [{**r, "record": Record.from_json(r["record"]).to_json()} for r in rows]
    steps["record JSON round trips (x4 stage boundaries)"] = time.perf_counter() - t
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in ("key", "image", "record")}
    t = time.perf_counter()
    out = finalize_batch(batch, nms=True, iou_threshold=0.8, min_segments=1)
    steps["mask NMS + segment ids"] = time.perf_counter() - t
    writer_cls = shards.ShardWriter  # imported (webdataset pulls in torch) outside the timing
    out_dir = Path(tempfile.mkdtemp(dir=tmp))
    t = time.perf_counter()
    with writer_cls(out_dir / "shards", max_samples=16) as w:
        for key, image, rec in zip(out["key"], out["image"], out["record"], strict=True):
            r = Record.from_json(rec)
            meta = r.to_sample_meta(str(key))
            w.write(meta, image)
    steps["sample validation + shard write (fsync per shard)"] = time.perf_counter() - t
    return steps, len(items)


def bench_overhead(tmp: Path) -> tuple[Entry, list[str]]:
    name, src_cfg = _sample_source(tmp)
    runs = [_overhead_once(src_cfg, tmp) for _ in range(OVERHEAD_REPEATS + 1)][1:]  # the first warms caches
    n = runs[0][1]
    steps = {k: statistics.median(r[0][k] for r in runs) / n * 1000 for k in runs[0][0]}
    totals = [sum(r[0].values()) / n * 1000 for r in runs]
    total = statistics.median(totals)
    entry = Entry.cost("pipeline-overhead", OVERHEAD_BUDGET_MS, total, "ms/image", 1.0,
                       f"{name}, one process, outside model forwards, against a {OVERHEAD_BUDGET_MS:.0f} ms budget; "
                       f"median of {len(totals)} (range {min(totals):.2f}-{max(totals):.2f} ms)")
    lines = [f"Per image, {name}, one process, median of {len(totals)} runs after one warm-up:", "",
             "| step | ms / image |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in steps.items()]
    lines += [f"| **total outside model forwards** | **{total:.2f}** |", ""]
    lines += _bench_job(src_cfg, tmp, n)
    return entry, lines


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


def run() -> Section:
    with tempfile.TemporaryDirectory() as d:
        nms_entries, nms_rows = bench_nms()
        overhead_entry, overhead = bench_overhead(Path(d))
    entries = [*nms_entries, overhead_entry]
    md = "\n".join([
        "## Curation pipeline (`benchmarks/bench_pipeline.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_pipeline`).", "",
        *entry_table(entries), "",
        f"Mask NMS on 640x480 RLE masks at IoU {NMS_THRESHOLD} (a third are near-duplicates); both keep the same "
        "set (asserted). Baseline: the usual loop, one `pycocotools.mask.iou` call per candidate against the "
        "masks kept so far. Ours: an upper bound of each pair's IoU from areas and boxes "
        "(`min(a, b, box overlap) / (a + b - min(...))`, never below the exact IoU), computed vectorised over "
        "area-sorted blocks, and exact pycocotools IoU only for the pairs past it, against masks kept so far. "
        "Runs alternate baseline/ours; medians.", "", *nms_rows, "",
        "Overhead of the pipeline outside model forwards:", "", *overhead, "",
        f"Machine: {machine().describe()}. The machine may be shared, so compare ratios within one run rather "
        "than absolute times across runs.",
    ])
    return Section(md, entries)
