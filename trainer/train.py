"""The training loop: AdamW on the trainable head, DDP, bf16 autocast on GPU, checkpoints, logs.

One step: a batch of images per rank (a variable number of segments each) -> frozen backbone
features (or the feature cache) -> segment embeddings through the DDP-wrapped model -> frozen text
embeddings of one randomly drawn text per segment (from the feature cache when it holds them,
else the text tower) -> symmetric contrastive loss with negatives
from every rank -> backward, global-norm clipping, AdamW step, scheduler step (warmup + cosine,
:mod:`trainer.optim`). The learning rate is a function of the step alone, so resuming needs only the
step number.

A non-finite loss or gradient norm is reported (log line, ``train/skipped_steps`` scalar,
``skipped`` in ``metrics.jsonl``) and that step makes no update: gradients are dropped, the
optimizer is not stepped. All ranks agree before deciding, so DDP never diverges. The step still
counts (its batch is consumed), which keeps the data position and the LR schedule in step with a
run that had no such event.

Outputs under ``OUTPUT/``: ``train_config.yaml``, ``metrics.jsonl`` (one line per step, rank 0),
``tensorboard/``, ``checkpoints/step-*/`` (see :mod:`trainer.checkpoint`), ``final/`` (the model via
``save_pretrained``), ``summary.json``, ``training.png`` (curves, :mod:`trainer.plots`), and with
``log_keys`` ``keys/rank{R}.txt`` (which samples each rank saw). An output directory that already
holds a run needs ``resume`` or ``overwrite`` (:mod:`trainer.rundir`). A run in which every step was
skipped, or whose weights end non-finite, raises :class:`~trainer.errors.TrainingFailed` and writes
no final model.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import shards

from .cache import FeatureCacheReader, cache_dir_for
from .checkpoint import restore, save_checkpoint
from .config import TrainConfig
from .data import SKIP, SampleProcessor, check_enough_shards, make_loader, steps_per_epoch
from .distributed import DistInfo, all_sum, all_true, barrier, cleanup, init_distributed, rank_divergence
from .errors import InputError, TrainingFailed
from .files import atomic_write_text
from .model import SegmentTextLoss, USEModel, named_trainable, text_ids
from .optim import make_optimizer, make_scheduler
from .plots import plot_metrics
from .rundir import check_run_dir, clear_run_dir, rewind_logs
from .runtime import autocast_for, build_model, seed_everything

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (tqdm's own format, so the log line and the progress bar agree)."""
    return tqdm.format_interval(max(0, int(seconds)))


def shard_list(shards_dir: str | Path) -> list[str]:
    """The shards to train on, or an :class:`InputError` naming what is missing."""
    p = str(shards_dir)
    local = "://" not in p and not p.startswith("pipe:") and "{" not in p
    if local and not Path(p).exists():
        raise InputError(f"--shards {p}: no such directory")
    try:
        return shards.shard_urls(shards_dir)
    except FileNotFoundError as e:
        raise InputError(f"--shards {p}: {e}") from e


def make_processor(cfg: TrainConfig, model: USEModel, shards_dir: str | Path) -> SampleProcessor:
    """Sample -> tensors for this model: from images, or from the feature cache when configured."""
    cache = None
    if cfg.use_feature_cache:
        cache = FeatureCacheReader(cache_dir_for(cfg.cache_dir, shards_dir), model.config.backbone_fingerprint())
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
                 device: str | None = None, overwrite: bool = False):
        self.cfg, self.output = cfg, Path(output)
        self.shards_dir = shards_dir  # a folder or an s3:// / gs:// URL (a Path would mangle the URL)
        self.info: DistInfo = init_distributed(device)
        self.device = self.info.device
        # Inputs first, on every rank and before anyone writes: a refused start leaves nothing behind.
        check_run_dir(self.output, resume, overwrite)
        self.urls = shard_list(shards_dir)
        check_enough_shards(cfg.data, self.urls, self.info.world_size)
        self.steps_per_epoch = steps_per_epoch(cfg.data, self.urls, self.info.world_size)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        seed_everything(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.loss_fn = SegmentTextLoss()
        self.processor = make_processor(cfg, self.model, self.shards_dir)
        self.step, self.samples_seen, self.segments_seen, self.skipped = 0, 0, 0, 0
        restored = restore(self.output, resume, self.model, self.optimizer, self.info)
        if resume is not None and restored is None:
            log.warning("--resume: no checkpoint under %s; starting from step 0", self.output)
        if restored is not None:
            _, state = restored
            self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
            self.segments_seen, self.skipped = int(state["segments_seen"]), int(state["skipped_steps"])
            if state.get("world_size") != self.info.world_size or state.get("batch_size") != cfg.data.batch_size:
                log.warning("resuming with another world size or batch size: the data order is not the original one")
            if state.get("scheduler") and state["scheduler"] != self._schedule():
                log.warning("resuming with another LR schedule than the checkpoint's (%s now, %s saved): the "
                            "rest of the run follows the new one", self._schedule(), state["scheduler"])
        self.start_step, self.start_skipped = self.step, self.skipped
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, self.total_steps, step=self.step)
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
        barrier()  # every rank has checked the run directory before rank 0 changes it
        self.tb = self.metrics = self.keys_file = None
        if self.info.is_master:
            if overwrite and resume is None:
                clear_run_dir(self.output)
            self.output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output / "train_config.yaml", cfg.to_yaml())
        barrier()
        dropped = rewind_logs(self.output, self.step, self.info.rank) if restored is not None else 0
        if dropped:
            log.info("logs cut back to step %d (%d lines of steps trained again now)", self.step, dropped)
        if self.info.is_master:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides this directory's events from the resumed step on
            self.tb = SummaryWriter(str(self.output / "tensorboard"),
                                    purge_step=self.step + 1 if restored is not None else None)
            self.metrics = (self.output / "metrics.jsonl").open("a", buffering=1)  # line by line: tail -f works
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
        lr = self.scheduler.get_last_lr()[0]
        moved = _to(batch, self.device)
        cached = batch.get("text_emb")
        if cached is not None:  # the frozen text tower's output, cached by `cache-features`
            text_emb = cached.to(self.device, non_blocking=self.device.type == "cuda").float()
        else:
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
        with warnings.catch_warnings():  # a skipped step steps the schedule without an optimizer step, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # skipped steps too: the rate follows the step count
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
        self.t_start = time.perf_counter()
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
        failure = self._failure()
        if failure:
            summary["failed"] = failure
        if self.info.is_master:
            if not failure:
                final = self.model.save_pretrained(self.output / "final")
                log.info("final model written to %s (%d steps, %d skipped)", final, self.step, self.skipped)
            atomic_write_text(self.output / "summary.json", json.dumps(summary, indent=1))
            try:
                log.info("training curves in %s", plot_metrics(self.output / "metrics.jsonl",
                                                               self.output / "training.png"))
            except ValueError as e:  # e.g. every step skipped: nothing to draw
                log.warning("no training curves: %s", e)
        barrier()
        if failure:
            raise TrainingFailed(failure)
        return summary

    def _failure(self) -> str | None:
        """Why this run produced nothing usable, or None: every step it ran skipped, or non-finite weights."""
        ran, skipped = self.step - self.start_step, self.skipped - self.start_skipped
        if ran > 0 and skipped == ran:
            return (f"all {ran} steps of this run were skipped (non-finite loss or gradients, see the warnings): "
                    f"no final model written")
        bad = [n for n, p in named_trainable(self.model) if not bool(torch.isfinite(p).all())]
        if bad:
            return f"non-finite weights {bad[:5]} at step {self.step}: no final model written"
        return None

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
            eta = format_eta(self._eta_s())
            bar.set_postfix(loss=f"{out['loss']:.4f}", seg_s=f"{seg_s:.0f}", data=f"{data / (data + compute + 1e-9):.0%}")
            bar.update(self.step - bar.n)
            log.info("step %d/%d loss %.4f lr %.2e T %.4f | %.0f segments/s, %.0f images/s | data %.3fs step %.3fs"
                     " | eta %s", self.step, self.total_steps, out["loss"], out["lr"], 1.0 / out["logit_scale"],
                     seg_s, img_s, data / steps, compute / steps, eta)

    def _eta_s(self) -> float:
        """Seconds to the last step at this run's mean pace so far (data wait included)."""
        done = self.step - self.start_step
        elapsed = time.perf_counter() - self.t_start
        return elapsed / max(done, 1) * (self.total_steps - self.step)

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
          device: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train to the configured length; returns a summary (steps, skipped steps, last step's figures).

    Raises :class:`~trainer.errors.InputError` before writing anything when the inputs or the run
    directory do not allow the run, :class:`~trainer.errors.TrainingFailed` when it produced nothing usable.
    """
    trainer = Trainer(cfg, shards_dir, output, resume=resume, device=device, overwrite=overwrite)
    try:
        return trainer.run()
    finally:
        trainer.close()
