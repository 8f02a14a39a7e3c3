"""Trainer throughput: steps from the feature cache against steps from images, and whether data keeps up.

Backbones of the real width and depth class with random weights (``benchmarks/configs/model-vitb16.yaml``:
CLIP ViT-B/16 at 224 px and DINOv2-S/14 at 224 px; the tiny test backbones would make the cache's gain
meaningless), on shards of the COCO val2017 sample (real 640x480 JPEGs and polygons), through the
real training loop (:func:`trainer.train.train`), on the GPU when there is one, else the CPU.

- ``cache-step``: the same run (same batches, same seed) from images and from the bf16 feature cache;
  per step the median step time after warm-up steps: from images the backbones and the text tower
  run, from the cache neither does (the cache holds the features and the text embeddings of every
  segment text, :mod:`trainer.cache`); both then run the trainable merge and head, the loss, backward
  and AdamW. Runs alternate images/cache. The FLOPs of one step's backbone and text-tower forwards and
  of the trainable part's forward and backward are counted (``torch.utils.flop_counter``) and set
  against the measured matmul rate.
- ``loader``: the data loader alone (decode, resize, RLE -> area weights, collate; one worker) in
  images/s against what the from-images step consumes; ``loader-cache`` the same for the cache path.
"""

from __future__ import annotations

import contextlib
import copy
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
IMAGES, WARMUP, REPEATS, STEPS = 8, 1, 2, 3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _config(*overrides: str):
    from trainer.config import TrainConfig

    return TrainConfig.from_yaml(CONFIG, [f"steps={STEPS}", *overrides])


def _run(cfg, shard_dir: Path, out: Path) -> dict[str, list[float]]:
    from trainer.train import train

    train(cfg, shard_dir, out, device=DEVICE)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    return {"step": [r["step_time"] for r in rows], "data": [r["data_time"] for r in rows],
            "segments": [r["segments"] for r in rows]}


def _loader_rate(cfg, model, shard_dir: Path, passes: int = 3) -> tuple[float, list[int]]:
    """Images per second out of the DataLoader alone (the same worker count as training), and the
    distinct texts of each batch (what the live step's text tower encodes: it encodes each once)."""
    import shards
    from trainer.data import make_loader, steps_per_epoch
    from trainer.train import make_processor

    urls = shards.shard_urls(shard_dir)
    per_epoch = steps_per_epoch(cfg.data, urls, 1)
    n, t0, distinct = 0, None, []
    # one loader over several epochs' worth of batches, clock started at the first batch: worker
    # start-up is not throughput
    for batch in make_loader(urls, cfg.data, make_processor(cfg, model, shard_dir), seed=0, epoch=0,
                             batches=passes * per_epoch):
        distinct.append(len(set(batch["texts"])))
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(batch["keys"])
    return n / (time.perf_counter() - t0), distinct


def _step_flops(model, batch_size: int, texts: int, segments: int) -> tuple[float, float, float]:
    """FLOPs of the backbones' forward on one batch, of the text tower on ``texts`` texts, and of the
    trainable part (merge, pooling, head; forward and backward) for ``segments`` segments.

    Images and texts go through the frozen towers independently (every text is padded to the full
    context), so one of each is counted and multiplied: the same figure for a fraction of the time.
    """
    from torch.utils.flop_counter import FlopCounterMode

    c, d = int(model.config.clip_image_size), int(model.config.dino_image_size)
    pixels = {"clip": torch.zeros(1, 3, c, c), "dino": torch.zeros(1, 3, d, d)}
    with FlopCounterMode(display=False) as fc:
        features = model.backbone_features(pixels)
    vision = fc.get_total_flops() * batch_size
    features = {k: v.expand(batch_size, *v.shape[1:]).contiguous() for k, v in features.items()}
    with FlopCounterMode(display=False) as fc:
        model.encode_text(["a text"])
    text = fc.get_total_flops() * texts
    p = model.grid * model.grid
    weights = torch.full((segments, p), 1.0 / p)
    index = torch.arange(segments) % batch_size
    with FlopCounterMode(display=False) as fc:
        model(features, weights, index).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(vision), float(text), float(fc.get_total_flops())


@contextlib.contextmanager
def _built_once():
    """Inside, every ``build_model`` of the trainer and the cache job returns a copy of one build.

    Building ViT-B/16 + DINOv2-S with random weights is mostly their random init (``trunc_normal_``,
    5-10 s here each time); it is not part of a step, and six builds would double this benchmark's
    time. ``build_model`` is deterministic (seeded from the config), so a copy is the same model.
    """
    import trainer.cache
    import trainer.train
    from trainer.runtime import build_model, model_config

    built: dict[str, torch.nn.Module] = {}

    def copy_of(cfg):
        key = json.dumps([cfg.seed, model_config(cfg).to_dict()], sort_keys=True)
        if key not in built:
            built[key] = build_model(cfg)
        return copy.deepcopy(built[key])

    saved = trainer.train.build_model, trainer.cache.build_model
    trainer.train.build_model = trainer.cache.build_model = copy_of
    try:
        yield copy_of
    finally:
        trainer.train.build_model, trainer.cache.build_model = saved


def _device_name() -> str:
    return f"GPU ({torch.cuda.get_device_name()}, bf16 autocast)" if DEVICE == "cuda" else "CPU (fp32)"


def run() -> Section:
    from trainer.cache import cache_features

    box = machine()
    with tempfile.TemporaryDirectory() as d, _built_once() as build_model:
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
        model = build_model(base).eval()  # for the loaders and the FLOP count
        load_images, distinct = _loader_rate(base, model, shard_dir)
        load_cache, _ = _loader_rate(cache_cfg, model, shard_dir)
    img_step, cache_step = (statistics.median(runs[k]["step"]) for k in ("images", "cache"))
    segments = int(statistics.median(runs["images"]["segments"]))
    texts = int(statistics.median(distinct))
    vision_flops, text_flops, head_flops = _step_flops(model, batch, texts, segments)
    spread = {k: f"{min(runs[k]['step']):.3f}-{max(runs[k]['step']):.3f} s" for k in runs}
    n_steps = len(runs["images"]["step"])
    vision_s, text_s, head_s = (box.flops_bound_s(f) for f in (vision_flops, text_flops, head_flops))
    entries = [
        Entry.cost("cache-step", img_step, cache_step, "s/step", 5.0,
                   f"{batch} images/step, ViT-B/16 + DINOv2-S/14 at 224 px (random weights), {_device_name()}; median "
                   f"of {n_steps} steps per path ({REPEATS} alternating runs, {WARMUP} warm-up steps each; ranges "
                   f"images {spread['images']}, cache {spread['cache']}); backbone forward {vision_flops / 1e9:.0f} "
                   f"GFLOP/step (>= {vision_s:.2f} s at the measured matmul rate) and text tower {text_flops / 1e9:.0f} GFLOP "
                   f"for {texts} distinct texts (>= {text_s:.2f} s), both only from images; trainable merge + head forward and "
                   f"backward {head_flops / 1e9:.1f} GFLOP (>= {head_s:.3f} s) on both; FLOP bound on the ratio "
                   f"{(vision_s + text_s + head_s) / head_s:.0f}x"),
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
        f"- Computing the cache (backbone features and the embeddings of every segment text) took {cache_s:.1f} s "
        f"once for {n_images} images.",
        f"- Bound: a step from images cannot be faster than its backbone and text-tower FLOPs over the matmul rate "
        f"({vision_s:.2f} s + {text_s:.2f} s for the {texts} distinct texts of a median step); a step from the cache runs neither (the cache holds "
        f"the text embeddings too) and cannot be faster than the trainable part's {head_flops / 1e9:.1f} GFLOP forward "
        f"and backward ({head_s:.3f} s). What the cache step spends above that is per-op overhead of a small "
        "network (LayerNorms, AdamW over the head's parameters, the loss), not arithmetic.",
        f"- Machine: {box.describe()}.",
    ]
    return Section("\n".join(lines) + "\n", entries)
