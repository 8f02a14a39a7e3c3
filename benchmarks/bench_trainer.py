"""Trainer throughput: steps from the feature cache vs from images, and whether data is the bottleneck.

On the synthetic shards with the tiny demo model (``trainer/configs/demo.yaml``), on the GPU when there is
one, else the CPU:

- the same training run (same batches, same seed) from images and from the fp16 feature cache;
  per step, the time the loop waited for data and the time the step itself took (forward with or
  without the backbones, backward, AdamW);
- the data loader alone (images decoded, transformed, RLE decoded to area weights, collated) in
  images per second, against what the training step consumes per second. The loader runs in
  worker processes beside the step, so data is the bottleneck only if its rate is the lower one.

The tiny backbones make the backbone share of a step far smaller than with ViT-L/14 + DINOv2-L,
so the cache speed-up here is a lower bound of a real run's.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, BATCH, WORKERS, REPEATS = 16, 3, 8, 1, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make_shards(tmp: Path) -> Path:
    from pipeline import synth

    sys.path.insert(0, str(ROOT / "tests"))
    from synth_shards import write_synth_shards

    data = synth.generate(tmp / "synth", 48, seed=0)
    return write_synth_shards(data, tmp / "shards", list(range(1, 49)), max_samples=8)


def _config(*overrides: str):
    from trainer.config import TrainConfig

    base = [f"steps={STEPS}", f"data.batch_size={BATCH}", f"data.workers={WORKERS}", "data.shuffle_buffer=16",
            "log_every=1000", "checkpoint_every=1000"]
    return TrainConfig.from_yaml(ROOT / "trainer" / "configs" / "demo.yaml", [*base, *overrides])


def _run(cfg, shard_dir: Path, out: Path) -> dict[str, float]:
    from trainer.train import train

    train(cfg, shard_dir, out, device=DEVICE)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    step = statistics.median(r["step_time"] for r in rows)
    data = statistics.median(r["data_time"] for r in rows)
    segs = statistics.mean(r["segments"] for r in rows)
    return {"step": step, "data": data, "wall": step + data, "segments": segs}


def _loader_rate(cfg, shard_dir: Path) -> float:
    """Images per second out of the DataLoader alone (the same workers as training)."""
    import shards
    from trainer.data import make_loader, steps_per_epoch
    from trainer.train import build_model, make_processor

    model = build_model(cfg).to(DEVICE)
    urls = shards.shard_urls(shard_dir)
    per_epoch = steps_per_epoch(cfg.data, urls, 1)
    n, t0 = 0, None
    # one loader over four epochs' worth of batches (its workers go on pass after pass): a loader per
    # epoch would count three more worker start-ups as loading time
    for batch in make_loader(urls, cfg.data, make_processor(cfg, model, shard_dir), seed=0, epoch=0,
                             batches=4 * per_epoch):
        if t0 is None:  # start the clock at the first batch: worker start-up is not throughput
            t0 = time.perf_counter()
            continue
        n += len(batch["keys"])
    return n / (time.perf_counter() - t0)


def _device_name() -> str:
    return f"GPU ({torch.cuda.get_device_name()}, bf16 autocast)" if DEVICE == "cuda" else "CPU (fp32)"


def run() -> str:
    from trainer.cache import cache_features

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shard_dir = _make_shards(tmp)
        cache_cfg = _config("use_feature_cache=true", f"cache_dir={tmp / 'cache'}", "cache_dtype=fp16")
        t0 = time.perf_counter()
        cache_features(cache_cfg, shard_dir, device=DEVICE)
        cache_s = time.perf_counter() - t0
        runs: dict[str, list[dict[str, float]]] = {"images": [], "cache": []}
        for rep in range(REPEATS):  # interleaved, best of REPEATS: shared machines have load spikes
            runs["images"].append(_run(_config(), shard_dir, tmp / f"images-{rep}"))
            runs["cache"].append(_run(cache_cfg, shard_dir, tmp / f"cache-{rep}"))
        images, cached = (min(runs[k], key=lambda r: r["step"]) for k in ("images", "cache"))
        load_images = _loader_rate(_config(), shard_dir)
        load_cache = _loader_rate(cache_cfg, shard_dir)
    step_rate_images = BATCH / images["step"]
    step_rate_cache = BATCH / cached["step"]
    lines = [
        "## Trainer: feature cache and data loading",
        "",
        f"Tiny demo model (`trainer/configs/demo.yaml`) on 48 synthetic images in 6 shards, {_device_name()}, {BATCH} images "
        f"per step, {WORKERS} loader worker; median of steps {WARMUP + 1}-{STEPS}, best of {REPEATS} interleaved runs "
        "(the same batches in every run). "
        "Command: `make bench` (`python -m benchmarks.run --only bench_trainer`).",
        "",
        "| run | step (s) | waiting for data (s) | wall per step (s) | segments/step |",
        "|---|---|---|---|---|",
        f"| from images | {images['step']:.3f} | {images['data']:.3f} | {images['wall']:.3f} | {images['segments']:.0f} |",
        f"| from fp16 feature cache | {cached['step']:.3f} | {cached['data']:.3f} | {cached['wall']:.3f} | "
        f"{cached['segments']:.0f} |",
        "",
        f"- Step time, images / cache: **{images['step'] / cached['step']:.2f}x** "
        f"(wall per step {images['wall'] / cached['wall']:.2f}x); computing the cache took {cache_s:.1f} s once.",
        f"- Data loader alone: **{load_images:.0f} images/s** from images, **{load_cache:.0f} images/s** from "
        f"the cache; the training step consumes {step_rate_images:.0f} images/s (images) and "
        f"{step_rate_cache:.0f} images/s (cache). Data is "
        f"{'not ' if load_images >= step_rate_images else ''}the bottleneck from images and "
        f"{'not ' if load_cache >= step_rate_cache else ''}the bottleneck from the cache.",
        f"- Loader workers per rank needed to keep up with this step (one worker measured): "
        f"{math.ceil(step_rate_images / load_images)} from images, {math.ceil(step_rate_cache / load_cache)} from "
        "the cache (`data.workers`; the real config uses 8).",
        "- The tiny backbones are a small part of a step here, so the ratio is small and moves with the "
        "machine's load; compare it only within one run of this benchmark.",
        "- With ViT-L/14-336 + DINOv2-L the backbones dominate a step from images, so the cache's gain is larger "
        "than here; the loader's per-image work (decode, resize, RLE) does not grow with the model.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
