"""One benchmark per model, each run in its own child process (:mod:`benchmarks.gpu.cli`).

Each function builds its architecture (:mod:`benchmarks.gpu.arch`), measures eagerly at every
configured batch size, then (time allowing) under ``torch.compile`` at the largest batch that ran,
and writes records through the :class:`~benchmarks.gpu.measure.Recorder`. Inputs are what the
pipeline stages feed the models: SAM gets 1024-px padded images and box prompts in original-image
pixels through the project's own :func:`pipeline.sam.embed_images` / :func:`pipeline.sam.decode_prompts`
and :class:`evaluation.proposals.MaskGenerator`; Grounding DINO gets images at the processor's
800-px short side with a realistic phrase set packed into prompts as the grounder packs them;
LLaVA gets 576 image tokens plus a prompt and generates a fixed number of tokens; the USE step
runs the trainer's model, loss and optimizer.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from .arch import CLS, DOT, SEP, build_grounding_dino, build_llava, build_sam, build_use
from .config import GpuBenchConfig, GroundingBench
from .measure import Recorder, compile_kwargs, matmul_peak


def _gen(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _compile_ok(cfg: GpuBenchConfig, enabled: bool, rec: Recorder, best: Any) -> bool:
    if not enabled:
        return False
    if best is None:
        rec.write(what="compile", skipped="no eager measurement ran")
        return False
    if rec.left() < cfg.compile_min_s:
        rec.write(what="compile", skipped=f"{rec.left():.0f} s left, compile needs {cfg.compile_min_s:.0f} s")
        return False
    return True


# --- matmul peak ------------------------------------------------------------------------------------
def run_matmul(cfg: GpuBenchConfig, rec: Recorder, device: torch.device, dtype: torch.dtype) -> None:
    peak = matmul_peak(cfg.matmul_n, dtype, device)
    rec.write(what="matmul peak", **peak)


# --- SAM --------------------------------------------------------------------------------------------
def run_sam(cfg: GpuBenchConfig, rec: Recorder, device: torch.device, dtype: torch.dtype) -> None:
    from evaluation.proposals import AMGConfig, MaskGenerator
    from pipeline.sam import decode_prompts, embed_images
    from shards import rle

    mc = cfg.sam
    model, processor = build_sam(cfg.size, mc.arch, device, dtype)
    side = model.config.vision_config.image_size
    g = _gen(device)
    best = None
    for b in mc.batch_sizes:
        px = torch.randn(b, 3, side, side, device=device, dtype=dtype, generator=g)
        r = rec.measure("image encoder", b, lambda px=px: model.get_image_embeddings(px), images=b,
                        warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=f"{side} px padded input")
        if r is not None:
            best = (b, px, r["flops"])
    h, w = mc.image_hw
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    emb, originals, reshaped = embed_images(model, processor, [image])
    x0 = rng.uniform(0, w * 0.7, mc.boxes_per_image)
    y0 = rng.uniform(0, h * 0.7, mc.boxes_per_image)
    boxes = np.stack([x0, y0, x0 + rng.uniform(8, w * 0.3, mc.boxes_per_image),
                      y0 + rng.uniform(8, h * 0.3, mc.boxes_per_image)], axis=1)

    def boxes_to_rles():
        logits, _ = decode_prompts(model, processor, emb[0], originals[0], reshaped[0], boxes=boxes)
        return rle.encode((logits[:, 0] > 0).cpu().numpy())

    rec.measure("box decoder + RLE", mc.boxes_per_image, boxes_to_rles, images=1, items=mc.boxes_per_image,
                item="boxes", warmup=cfg.warmup, iters=mc.iters or cfg.iters,
                note=f"{mc.boxes_per_image} boxes on one {w}x{h} image: prompt encoder, mask decoder, upscale, RLE")
    if mc.amg:
        amg = AMGConfig(points_per_side=mc.amg_points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        generator = MaskGenerator(amg, processor, model, "random-weights")
        rec.measure("automatic masks", 1, lambda: generator.generate(image), images=1, warmup=0, iters=1,
                    note=f"{mc.amg_points_per_side}^2 points on a {w}x{h} image, quality filters off (every mask "
                         "post-processed: an upper bound of the evaluation's cost)")
    if _compile_ok(cfg, mc.compile, rec, best):
        b, px, flops = best
        encoder = torch.compile(model.get_image_embeddings, **compile_kwargs(cfg.compile_backend, cfg.compile_mode))
        rec.measure("image encoder", b, lambda: encoder(px), images=b, compiled=True, flops=flops,
                    warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=f"{side} px padded input")


# --- Grounding DINO ---------------------------------------------------------------------------------
def phrase_prompts(mc: GroundingBench, max_len: int, vocab: int) -> list[list[int]]:
    """Token ids of the prompts the grounder makes from the phrase set: ``[CLS] p1 . p2 . ... [SEP]``,
    each under ``max_len`` tokens; word pieces drawn at random from the ordinary vocabulary."""
    rng = np.random.default_rng(0)
    lo = 2000 if vocab > 2100 else DOT + 20
    prompts, cur = [], [CLS]
    for phrase in mc.phrases:
        n = max(1, round(len(phrase.split()) * mc.tokens_per_word))
        piece = [int(t) for t in rng.integers(lo, vocab - 1, size=n)] + [DOT]
        if len(cur) + len(piece) + 1 > max_len and len(cur) > 1:
            prompts.append(cur + [SEP])
            cur = [CLS]
        cur += piece[: max_len - 2]
    prompts.append(cur + [SEP])
    return prompts


def run_grounding(name: str, cfg: GpuBenchConfig, rec: Recorder, device: torch.device, dtype: torch.dtype) -> None:
    mc: GroundingBench = getattr(cfg, name)
    model = build_grounding_dino(cfg.size, mc.variant, mc.arch, device, dtype)
    prompts = phrase_prompts(mc, int(model.config.max_text_len), int(model.config.text_config.vocab_size))
    per_image = len(prompts)
    length = max(len(p) for p in prompts)
    h, w = mc.image_hw
    g = _gen(device)
    note = (f"{len(mc.phrases)} phrases -> {per_image} prompts of <= {model.config.max_text_len} tokens per image; "
            f"input {w}x{h}")

    def inputs(b: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(b, length, dtype=torch.long)
        mask = torch.zeros(b, length, dtype=torch.long)
        for i in range(b):
            p = prompts[i % per_image]
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        return {"pixel_values": torch.randn(b, 3, h, w, device=device, dtype=dtype, generator=g),
                "pixel_mask": torch.ones(b, h, w, dtype=torch.long, device=device),
                "input_ids": ids.to(device), "attention_mask": mask.to(device),
                "token_type_ids": torch.zeros(b, length, dtype=torch.long, device=device)}

    best = None
    for b in mc.batch_sizes:
        x = inputs(b)
        r = rec.measure("forward", b, torch.inference_mode()(lambda x=x: model(**x)), images=b / per_image, items=b,
                        item="(image, prompt) pairs", warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=note)
        if r is not None:
            best = (b, x, r["flops"])
    if _compile_ok(cfg, mc.compile, rec, best):
        b, x, flops = best
        compiled = torch.compile(model, **compile_kwargs(cfg.compile_backend, cfg.compile_mode))
        rec.measure("forward", b, torch.inference_mode()(lambda: compiled(**x)), images=b / per_image, items=b,
                    item="(image, prompt) pairs", compiled=True, flops=flops, warmup=cfg.warmup, iters=mc.iters or cfg.iters,
                    note=note)


# --- LLaVA ------------------------------------------------------------------------------------------
def run_llava(cfg: GpuBenchConfig, rec: Recorder, device: torch.device, dtype: torch.dtype) -> None:
    from transformers import CompileConfig

    mc = cfg.llava
    model = build_llava(cfg.size, mc.arch, device, dtype)
    c = model.config
    rng = np.random.default_rng(0)
    top = min(int(c.image_token_index), int(c.text_config.vocab_size)) - 1
    words = lambda n: [int(t) for t in rng.integers(3, top, size=n)]  # noqa: E731
    ids = [1, *words(5), *([int(c.image_token_index)] * int(c.image_seq_length)), *words(mc.prompt_tokens)]
    side = c.vision_config.image_size
    g = _gen(device)
    n = mc.new_tokens
    note = (f"{len(ids)}-token prompt ({c.image_seq_length} image tokens), {n} new tokens per sequence, greedy; "
            f"{mc.prompts_per_image} prompts per image")

    def gen_fn(b: int, **extra: Any):
        input_ids = torch.tensor([ids] * b, device=device)
        pixels = torch.randn(b, 3, side, side, device=device, dtype=dtype, generator=g)
        attn = torch.ones_like(input_ids)
        return lambda: model.generate(input_ids=input_ids, attention_mask=attn, pixel_values=pixels, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)

    best = None
    for b in mc.batch_sizes:
        r = rec.measure("generate", b, gen_fn(b), images=b / mc.prompts_per_image, items=b * n, item="new tokens",
                        warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=note)
        if r is not None:
            best = (b, r["flops"])
    if _compile_ok(cfg, mc.compile, rec, best):
        b, flops = best
        inductor = cfg.compile_backend == "inductor"
        cc = CompileConfig(backend=cfg.compile_backend, mode=(cfg.compile_mode or "reduce-overhead") if inductor
                           else "default")
        if device.type != "cuda":
            cc._compile_all_devices = True  # transformers compiles generate's forward only on accelerators otherwise
        rec.measure("generate", b, gen_fn(b, cache_implementation="static", compile_config=cc),
                    images=b / mc.prompts_per_image, items=b * n, item="new tokens", compiled=True, flops=flops,
                    warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=note + "; static KV cache, decoding step compiled")


# --- USE: CLIP + DINOv2 features and the training step ------------------------------------------------
def run_use(cfg: GpuBenchConfig, rec: Recorder, device: torch.device, dtype: torch.dtype) -> None:
    from trainer.config import OptimConfig
    from trainer.model import SegmentTextLoss, text_ids
    from trainer.optim import make_optimizer

    mc = cfg.use
    model = build_use(cfg.size, mc.arch, device)
    mcfg = model.config
    g = _gen(device)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def pixels(b: int) -> dict[str, torch.Tensor]:
        c, d = int(mcfg.clip_image_size), int(mcfg.dino_image_size)
        return {"clip": torch.randn(b, 3, c, c, device=device, generator=g),
                "dino": torch.randn(b, 3, d, d, device=device, generator=g)}

    def features(backbones, px):
        with torch.no_grad(), autocast:
            return backbones(px)

    note = (f"CLIP {mcfg.clip_image_size} px ({mcfg.grid}x{mcfg.grid}) + DINOv2 {mcfg.dino_image_size} px, "
            f"layers {mcfg.clip_layers} / {mcfg.dino_layers}, bf16 autocast on fp32 weights (as the trainer)")
    best = None
    for b in mc.batch_sizes:
        px = pixels(b)
        r = rec.measure("features", b, lambda px=px: features(model.backbones, px), images=b, warmup=cfg.warmup,
                        iters=mc.iters or cfg.iters, note=note)
        if r is not None:
            best = (b, px, r["flops"])

    loss_fn = SegmentTextLoss()
    opt = make_optimizer(model, OptimConfig())
    grid2 = int(mcfg.grid) ** 2
    feat_batch = max(mc.batch_sizes)
    for b in mc.train_batch_sizes:
        s = b * mc.segments_per_image
        try:
            weights = torch.rand(s, grid2, device=device, generator=g)
            weights = torch.where(weights > 0.9, weights, torch.zeros_like(weights))  # sparse like a segment
            weights[:, 0] += 1e-3
            weights = weights / weights.sum(1, keepdim=True)
            index = torch.arange(b, device=device).repeat_interleave(mc.segments_per_image)
            texts = [f"phrase number {i}" for i in range(s)]
            tids = text_ids(texts)
            px = pixels(b)
            parts = [features(model.backbones, {k: v[i:i + feat_batch] for k, v in px.items()})
                     for i in range(0, b, feat_batch)]
            cached = {k: torch.cat([p[k] for p in parts]).to(torch.bfloat16) for k in parts[0]}  # the bf16 cache
            with torch.no_grad():  # the cache also holds the frozen text tower's fp32 embeddings (trainer.cache)
                cached_text = model.encode_text(texts).float()
        except Exception as e:
            rec.write(what="train step", batch=b, error=f"{type(e).__name__}: {e}"[:500])
            continue

        def step(inputs, text_emb=None, weights=weights, index=index, texts=texts, tids=tids):
            model.train()
            if text_emb is None:  # from images: the text tower runs every step
                with torch.no_grad():
                    text_emb = model.encode_text(texts).float()
            with autocast:
                emb, scale = model(inputs, weights, index, return_logit_scale=True)
            loss = loss_fn(emb.float(), text_emb, scale.float(), text_ids=tids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        tnote = f"{mc.segments_per_image} segments per image, {s} distinct texts"
        rec.measure("train step (feature cache)", b, lambda c=cached, t=cached_text: step(c, t), images=b,
                    warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=tnote + " (text embeddings from the cache)")
        rec.measure("train step (images)", b, lambda p=px: step(p), images=b, warmup=cfg.warmup, iters=mc.iters or cfg.iters,
                    note=tnote + " through the CLIP text tower")
        del cached, cached_text, px
    if _compile_ok(cfg, mc.compile, rec, best):
        b, px, flops = best
        backbones = torch.compile(model.backbones, **compile_kwargs(cfg.compile_backend, cfg.compile_mode))
        rec.measure("features", b, lambda: features(backbones, px), images=b, compiled=True, flops=flops,
                    warmup=cfg.warmup, iters=mc.iters or cfg.iters, note=note)


RUNNERS = {
    "matmul": run_matmul,
    "sam": run_sam,
    "gdino_t": lambda *a: run_grounding("gdino_t", *a),
    "gdino_b": lambda *a: run_grounding("gdino_b", *a),
    "llava": run_llava,
    "use": run_use,
}


def images_per_s(record: dict[str, Any]) -> float:
    return record["images"] / record["median_s"] if record.get("median_s") else math.nan
