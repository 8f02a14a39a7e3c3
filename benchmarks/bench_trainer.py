"""Trainer throughput: steps from the feature cache against steps from images, and whether data keeps up.

Backbones of the real width and depth class with random weights (``benchmarks/configs/model-vitb16.yaml``:
CLIP ViT-B/16 at 224 px and DINOv2-S/14 at 224 px; the tiny test backbones would make the cache's gain
meaningless), on shards of the COCO val2017 sample (real 640x480 JPEGs and polygons), through the
real training loop (:func:`trainer.train.train`), on the GPU when there is one, else the CPU.

- ``cache-step``: the same run (same batches, same seed) from images and from the bf16 feature cache;
  per step the median step time (forward with or without the backbones, text tower, backward, AdamW)
  after warm-up steps. Runs alternate images/cache. The FLOPs of one step's backbone and text-tower
  forwards are counted (``torch.utils.flop_counter``) and set against the measured matmul rate.
- ``loader``: the data loader alone (decode, resize, RLE -> area weights, collate; one worker) in
  images/s against what the from-images step consumes; ``loader-cache`` the same for the cache path.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Entry, Section, entry_table, machine
from benchmarks.data import sample_shards

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "train-vitb16.yaml"
IMAGES, WARMUP, REPEATS = 8, 1, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _config(*overrides: str):
    from trainer.config import TrainConfig

    return TrainConfig.from_yaml(CONFIG, list(overrides))


def _run(cfg, shard_dir: Path, out: Path) -> dict[str, list[float]]:
    from trainer.train import train

    train(cfg, shard_dir, out, device=DEVICE)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    return {"step": [r["step_time"] for r in rows], "data": [r["data_time"] for r in rows],
            "segments": [r["segments"] for r in rows]}


def _loader_rate(cfg, model, shard_dir: Path, passes: int = 3) -> float:
    """Images per second out of the DataLoader alone (the same worker count as training)."""
    import shards
    from trainer.data import make_loader, steps_per_epoch
    from trainer.train import make_processor

    urls = shards.shard_urls(shard_dir)
    per_epoch = steps_per_epoch(cfg.data, urls, 1)
    n, t0 = 0, None
    # one loader over several epochs' worth of batches, clock started at the first batch: worker
    # start-up is not throughput
    for batch in make_loader(urls, cfg.data, make_processor(cfg, model, shard_dir), seed=0, epoch=0,
                             batches=passes * per_epoch):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(batch["keys"])
    return n / (time.perf_counter() - t0)


def _step_flops(model, batch_size: int, texts: int) -> tuple[float, float]:
    """FLOPs of the backbones' forward on one batch and of the text tower on ``texts`` texts."""
    from torch.utils.flop_counter import FlopCounterMode

    c, d = int(model.config.clip_image_size), int(model.config.dino_image_size)
    pixels = {"clip": torch.zeros(batch_size, 3, c, c), "dino": torch.zeros(batch_size, 3, d, d)}
    with FlopCounterMode(display=False) as fc:
        model.backbone_features(pixels)
    vision = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.encode_text([f"text {i}" for i in range(texts)])
    return float(vision), float(fc.get_total_flops())


def _device_name() -> str:
    return f"GPU ({torch.cuda.get_device_name()}, bf16 autocast)" if DEVICE == "cuda" else "CPU (fp32)"


def run() -> Section:
    from trainer.cache import cache_features

    box = machine()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data_name, shard_dir, n_images, _ = sample_shards(tmp, max_samples=8, limit=IMAGES)
        base = _config()
        batch = base.data.batch_size
        cache_cfg = _config("use_feature_cache=true", f"cache_dir={tmp / 'cache'}")
        t0 = time.perf_counter()
        cache_features(cache_cfg, shard_dir, device=DEVICE)
        cache_s = time.perf_counter() - t0
        runs: dict[str, dict[str, list[float]]] = {"images": {}, "cache": {}}
        for rep in range(REPEATS):  # interleaved: shared machines have load spikes
            for kind, cfg in (("images", base), ("cache", cache_cfg)):
                got = _run(cfg, shard_dir, tmp / f"{kind}-{rep}")
                for k, v in got.items():
                    runs[kind].setdefault(k, []).extend(v)
        from trainer.train import build_model

        model = build_model(base).eval()  # one build for the loaders and the FLOP count
        load_images = _loader_rate(base, model, shard_dir)
        load_cache = _loader_rate(cache_cfg, model, shard_dir)
    img_step, cache_step = (statistics.median(runs[k]["step"]) for k in ("images", "cache"))
    texts = int(statistics.median(runs["images"]["segments"]))
    vision_flops, text_flops = _step_flops(model, batch, min(texts, 16))
    spread = {k: f"{min(runs[k]['step']):.3f}-{max(runs[k]['step']):.3f} s" for k in runs}
    n_steps = len(runs["images"]["step"])
    vision_s, text_s = box.flops_bound_s(vision_flops), box.flops_bound_s(text_flops)
    entries = [
        Entry.cost("cache-step", img_step, cache_step, "s/step", 5.0,
                   f"{batch} images/step, ViT-B/16 + DINOv2-S/14 at 224 px (random weights), {_device_name()}; median "
                   f"of {n_steps} steps per path ({REPEATS} alternating runs, {WARMUP} warm-up steps each; ranges "
                   f"images {spread['images']}, cache {spread['cache']}); backbone forward {vision_flops / 1e9:.0f} "
                   f"GFLOP/step (>= {vision_s:.2f} s at the measured matmul rate); text tower "
                   f"{text_flops / 1e9:.0f} GFLOP for {min(texts, 16)} texts (>= {text_s:.2f} s), paid on both paths"),
        Entry.rate("loader", batch / img_step, load_images, "images/s", None,
                   f"one loader worker (decode, resize, RLE -> area weights, collate) against the from-images step's "
                   f"consumption; workers per rank to keep up: {math.ceil(batch / img_step / load_images)}"),
        Entry.rate("loader-cache", batch / cache_step, load_cache, "images/s", None,
                   f"one loader worker reading the bf16 feature cache against the cache step's consumption; "
                   f"workers per rank to keep up: {math.ceil(batch / cache_step / load_cache)}"),
    ]
    lines = [
        "## Trainer: feature cache and data loading (`benchmarks/bench_trainer.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_trainer`).", "",
        *entry_table(entries), "",
        f"`{CONFIG.relative_to(ROOT)}`: CLIP ViT-B/16 (224 px, 12 x 768) and DINOv2-S/14 (224 px, 12 x 384) with "
        f"random weights, on {data_name}, {_device_name()}, {batch} images per step, 1 loader worker, through "
        "`trainer.train.train` (the same batches in every run).", "",
        "| run | step (s, median) | waiting for data (s, median) | segments/step |", "|---|---:|---:|---:|",
    ]
    for kind, label in (("images", "from images"), ("cache", "from bf16 feature cache")):
        r = runs[kind]
        lines.append(f"| {label} | {statistics.median(r['step']):.3f} | {statistics.median(r['data']):.3f} | "
                     f"{statistics.mean(r['segments']):.0f} |")
    lines += [
        "",
        f"- Computing the cache took {cache_s:.1f} s once for {n_images} images.",
        f"- Bound: a step from images cannot be faster than its backbone FLOPs over the matmul rate "
        f"({vision_s:.2f} s) and the cache step cannot be faster than the text tower's ({text_s:.2f} s), so the text "
        "tower, encoded on every step on both paths, caps the ratio at about "
        f"{(vision_s + text_s) / max(text_s, 1e-9):.1f}x here; with many distinct texts per step (curated phrases) "
        "it weighs more.",
        f"- Machine: {box.describe()}.",
    ]
    return Section("\n".join(lines) + "\n", entries)
