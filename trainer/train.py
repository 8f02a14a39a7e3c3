"""The training loop: AdamW on the trainable head, DDP, bf16 autocast on GPU, checkpoints, logs.

One step: a batch of images per rank (a variable number of segments each) -> frozen backbone
features (or the feature cache) -> segment embeddings through the DDP-wrapped model -> frozen text
embeddings of one randomly drawn text per segment -> symmetric contrastive loss with negatives
from every rank -> backward, global-norm clipping, AdamW step. The learning rate is a pure
function of the step (linear warmup, cosine decay), so resuming needs only the step number.

A non-finite loss or gradient norm is reported (log line, ``train/skipped_steps`` scalar,
``skipped`` in ``metrics.jsonl``) and that step makes no update: gradients are dropped, the
optimizer is not stepped. All ranks agree before deciding, so DDP never diverges. The step still
counts (its batch is consumed), which keeps the data position and the LR schedule in step with a
run that had no such event.

Outputs under ``OUTPUT/``: ``train_config.yaml``, ``metrics.jsonl`` (one line per step, rank 0),
``tensorboard/``, ``checkpoints/step-*/`` (see :mod:`trainer.checkpoint`), ``final/`` (the model via
``save_pretrained``), ``training.png`` (curves, :mod:`trainer.plots`), and with ``log_keys`` ``keys/rank{R}.txt`` (which samples each rank saw).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import shards

from .cache import FeatureCacheReader
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import OptimConfig, TrainConfig
from .data import SKIP, SampleProcessor, check_enough_shards, make_loader, steps_per_epoch
from .distributed import DistInfo, all_sum, all_true, barrier, cleanup, init_distributed, rank_divergence
from .model import SegmentTextLoss, USEModel, named_trainable, text_ids
from .plots import plot_metrics
from .runtime import autocast_for, build_model, seed_everything

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine from ``lr`` down to ``min_lr`` at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (open_clip's rule: not on norms, biases, scales, temperature)."""
    decay, no_decay = [], []
    for name, p in named_trainable(model):
        (decay if p.ndim >= 2 and "logit_scale" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def make_processor(cfg: TrainConfig, model: USEModel, shards_dir: Path) -> SampleProcessor:
    """Sample -> tensors for this model: from images, or from the feature cache when configured."""
    cache = None
    if cfg.use_feature_cache:
        cache = FeatureCacheReader(cfg.cache_dir or shards_dir, model.config.backbone_fingerprint())
    return SampleProcessor(transform=None if cache else model.transform, grid=model.grid,
                           max_segments=cfg.data.max_segments_per_image, min_area=cfg.data.min_segment_area,
                           cache=cache)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    inputs = batch.get("features") or batch["pixels"]
    return {
        "inputs": {k: v.to(device, non_blocking=nb) for k, v in inputs.items()},
        "area_weights": batch["area_weights"].to(device, non_blocking=nb),
        "image_index": batch["image_index"].to(device, non_blocking=nb),
    }


class Trainer:
    """Holds the state of one training run; :meth:`run` trains to ``total_steps``."""

    def __init__(self, cfg: TrainConfig, shards_dir: str | Path, output: str | Path, resume: str | None = None,
                 device: str | None = None):
        self.cfg, self.output = cfg, Path(output)
        self.shards_dir = Path(shards_dir)
        self.info: DistInfo = init_distributed(device)
        self.device = self.info.device
        seed_everything(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.loss_fn = SegmentTextLoss()
        self.urls = shards.shard_urls(self.shards_dir)
        check_enough_shards(cfg.data, self.urls, self.info.world_size)
        self.steps_per_epoch = steps_per_epoch(cfg.data, self.urls, self.info.world_size)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.processor = make_processor(cfg, self.model, self.shards_dir)
        self.step, self.samples_seen, self.segments_seen, self.skipped = 0, 0, 0, 0
        ckpt = resolve_checkpoint(self.output, resume)
        if resume is not None and ckpt is None:
            log.warning("--resume: no checkpoint under %s; starting from step 0", self.output)
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.info)
            self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
            self.segments_seen, self.skipped = int(state["segments_seen"]), int(state["skipped_steps"])
            if state.get("world_size") != self.info.world_size or state.get("batch_size") != cfg.data.batch_size:
                log.warning("resuming with another world size or batch size: the data order is not the original one")
            if state.get("scheduler") and state["scheduler"] != self._schedule():
                log.warning("resuming with another LR schedule than the checkpoint's (%s now, %s saved): the "
                            "rest of the run follows the new one", self._schedule(), state["scheduler"])
        self.ddp = self.model
        if self.info.distributed:
            # The frozen backbones (0.6 B parameters for ViT-L + DINOv2-L) are built identically on every
            # rank and never change: keep DDP from broadcasting them at start-up (GBs) and from syncing
            # their buffers; only the trainable head is DDP's business.
            trainable = {n for n, _ in named_trainable(self.model)}
            frozen = [n for n, _ in self.model.named_parameters() if n not in trainable]
            frozen += [n for n, _ in self.model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(self.model, frozen)
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False, find_unused_parameters=cfg.find_unused_parameters)
        self.tb = self.metrics = self.keys_file = None
        if self.info.is_master:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "train_config.yaml").write_text(cfg.to_yaml())
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.output / "tensorboard"))
            self.metrics = (self.output / "metrics.jsonl").open("a")
        if cfg.log_keys:
            (self.output / "keys").mkdir(parents=True, exist_ok=True)
            self.keys_file = (self.output / "keys" / f"rank{self.info.rank}.txt").open("a")
        log.info("rank %d/%d on %s: %d shards, %d steps per epoch, %d steps in all, starting at %d (%s)",
                 self.info.rank, self.info.world_size, self.device, len(self.urls), self.steps_per_epoch,
                 self.total_steps, self.step, "feature cache" if cfg.use_feature_cache else "images")

    def _schedule(self) -> dict[str, Any]:
        """The LR schedule as saved in checkpoints (a pure function of the step, see :func:`lr_at`)."""
        o = self.cfg.optim
        return {"kind": "warmup_cosine", "lr": o.lr, "min_lr": o.min_lr, "warmup_steps": o.warmup_steps,
                "total_steps": self.total_steps}

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        lr = lr_at(self.step, self.total_steps, self.cfg.optim)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        moved = _to(batch, self.device)
        with torch.no_grad():
            text_emb = self.model.encode_text(batch["texts"]).float()
        self.model.train()
        with autocast_for(self.device, self.cfg.precision):
            seg_emb, scale = self.ddp(moved["inputs"], moved["area_weights"], moved["image_index"],
                                      return_logit_scale=True)
        loss = self.loss_fn(seg_emb.float(), text_emb, scale.float(), text_ids=text_ids(batch["texts"]))
        loss_ok = all_true(bool(torch.isfinite(loss)), self.device)
        loss.backward()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), clip)
        ok = loss_ok and bool(torch.isfinite(grad_norm))  # the gradient norm is already global after DDP
        if ok:
            self.optimizer.step()
        else:
            self.skipped += 1
            log.warning("step %d: non-finite %s (loss %s, grad norm %s): step skipped, no update made",
                        self.step + 1, "loss" if not loss_ok else "gradient", float(loss.detach()), float(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "lr": lr, "logit_scale": float(scale.detach()),
                "grad_norm": float(grad_norm), "skipped": not ok, "segments": len(batch["texts"])}

    # -- the loop ----------------------------------------------------------------------------
    def batches(self):
        """Batches from the current step on, epoch after epoch, each loader resumed at its position."""
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            loader = make_loader(self.urls, self.cfg.data, self.processor, seed=self.cfg.data_seed, epoch=epoch,
                                 batches=self.steps_per_epoch, start=start, pin_memory=self.device.type == "cuda")
            for batch in loader:
                if SKIP in batch:
                    continue
                yield epoch, batch
                if self.step >= self.total_steps:
                    return

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        # A progress bar on an interactive rank 0; batch jobs (SLURM logs, CI) get the log lines only.
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.info.is_master and sys.stderr.isatty()))
        window = {"data": 0.0, "compute": 0.0, "segments": 0.0, "images": 0.0, "steps": 0.0}
        last = None
        t_wait = time.perf_counter()
        for epoch, batch in self.batches():
            t_data = time.perf_counter() - t_wait
            t0 = time.perf_counter()
            out = self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t_compute = time.perf_counter() - t0
            self.step += 1
            n_img = len(batch["keys"])
            self.samples_seen += n_img * self.info.world_size
            self.segments_seen += out["segments"]
            for k, v in (("data", t_data), ("compute", t_compute), ("segments", out["segments"]),
                         ("images", n_img), ("steps", 1)):
                window[k] += v
            if self.keys_file is not None:
                self.keys_file.write(f"{self.step} {epoch} {' '.join(batch['keys'])}\n")
            last = out
            if self.metrics is not None:
                self.metrics.write(json.dumps({"step": self.step, "epoch": epoch, **out,
                                               "data_time": t_data, "step_time": t_compute}) + "\n")
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log(out, window, bar)
                window = dict.fromkeys(window, 0.0)
            stop = cfg.stop_at is not None and self.step >= cfg.stop_at and self.step < self.total_steps
            if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps or stop:
                self._flush()
                save_checkpoint(self.output, self.model, self.optimizer, self._state(epoch), self.info,
                                keep=cfg.keep_checkpoints)
            if stop:
                bar.close()
                log.info("stop_at=%d reached: leaving at step %d of %d; continue with --resume",
                         cfg.stop_at, self.step, self.total_steps)
                return {"steps": self.step, "skipped_steps": self.skipped, "stopped": True, "last": last,
                        "output": str(self.output)}
            t_wait = time.perf_counter()
        bar.close()
        self._flush()
        divergence = rank_divergence(self.model.trainable_parameters())  # DDP's promise, checked once
        if divergence > 0:
            log.error("trainable parameters differ across ranks by up to %g", divergence)
        summary = {"steps": self.step, "skipped_steps": self.skipped, "world_size": self.info.world_size,
                   "rank_param_max_diff": divergence, "last": last, "output": str(self.output)}
        if self.info.is_master:
            final = self.model.save_pretrained(self.output / "final")
            (self.output / "summary.json").write_text(json.dumps(summary, indent=1))
            log.info("final model written to %s (%d steps, %d skipped)", final, self.step, self.skipped)
            try:
                log.info("training curves in %s", plot_metrics(self.output / "metrics.jsonl",
                                                               self.output / "training.png"))
            except ValueError as e:  # e.g. every step skipped: nothing to draw, the run itself is fine
                log.warning("no training curves: %s", e)
        barrier()
        return summary

    def _state(self, epoch: int) -> dict[str, Any]:
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": self.step % self.steps_per_epoch,
                "samples_seen": self.samples_seen, "segments_seen": self.segments_seen,
                "skipped_steps": self.skipped, "batch_size": self.cfg.data.batch_size,
                "scheduler": self._schedule()}

    def _log(self, out: dict[str, Any], window: dict[str, float], bar: tqdm) -> None:
        data, compute, segs, imgs, steps = all_sum(
            [window["data"], window["compute"], window["segments"], window["images"], window["steps"]], self.device)
        world = self.info.world_size
        wall = (data + compute) / world  # mean seconds per rank over the window
        seg_s, img_s = segs / max(wall, 1e-9), imgs / max(wall, 1e-9)
        if self.info.is_master:
            scalars = {"loss": out["loss"], "lr": out["lr"], "logit_scale": out["logit_scale"],
                       "temperature": 1.0 / out["logit_scale"], "grad_norm": out["grad_norm"],
                       "segments_per_s": seg_s, "images_per_s": img_s, "data_time": data / steps,
                       "step_time": compute / steps, "skipped_steps": self.skipped}
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, self.step)
            bar.set_postfix(loss=f"{out['loss']:.4f}", seg_s=f"{seg_s:.0f}", data=f"{data / (data + compute + 1e-9):.0%}")
            bar.update(self.step - bar.n)
            log.info("step %d/%d loss %.4f lr %.2e T %.4f | %.0f segments/s, %.0f images/s | data %.3fs step %.3fs",
                     self.step, self.total_steps, out["loss"], out["lr"], 1.0 / out["logit_scale"], seg_s, img_s,
                     data / steps, compute / steps)

    def _flush(self) -> None:
        for f in (self.metrics, self.keys_file):
            if f is not None:
                f.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        for f in (self.metrics, self.keys_file):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()
        cleanup()


def train(cfg: TrainConfig, shards_dir: str | Path, output: str | Path, resume: str | None = None,
          device: str | None = None) -> dict[str, Any]:
    """Train to the configured length; returns a summary (steps, skipped steps, last step's figures)."""
    trainer = Trainer(cfg, shards_dir, output, resume=resume, device=device)
    try:
        return trainer.run()
    finally:
        trainer.close()
