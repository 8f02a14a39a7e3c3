"""``python -m trainer``: train USE on shards, or cache the frozen backbones' features.

    python -m trainer train --config trainer/configs/demo.yaml --shards DIR --output DIR [--resume | --resume-from CKPT] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m trainer train ...      # DDP, one process per GPU (gloo on CPU)
    python -m trainer cache-features --config CFG --shards DIR [--out DIR]

Overrides are dotted config keys with YAML values: ``steps=200 data.batch_size=16 optim.lr=1e-4``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import TrainConfig


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.DEBUG if verbose else logging.INFO
    if rank != "0" and not verbose:
        level = logging.WARNING  # one rank talks; the others only warn
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (e.g. trainer/configs/demo.yaml)")
    p.add_argument("--shards", required=True, help="directory of shards (PREFIX-NNNNNN.tar + stats files)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on every rank")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys, YAML values")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the segment embedding head (torchrun for several processes)",
                       description="Train USE on shards. Writes OUTPUT/final (config.json + model.safetensors), "
                                   "OUTPUT/checkpoints, OUTPUT/tensorboard and OUTPUT/metrics.jsonl.")
    _common(t)
    t.add_argument("--output", required=True, help="run directory (checkpoints, logs, final model)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoints/latest; starts fresh with a warning when there is none")
    t.add_argument("--resume-from", default=None, metavar="CKPT", help="continue from this checkpoint directory")
    c = sub.add_parser("cache-features", help="compute the frozen backbone features once, beside the shards",
                       description="Writes PREFIX-NNNNNN.features.safetensors per shard (cache_dtype of the config). "
                                   "Train from it with use_feature_cache=true.")
    _common(c)
    c.add_argument("--out", default=None, help="cache directory (default: config cache_dir, else the shards dir)")
    c.add_argument("--batch-size", type=int, default=32, help="images per backbone forward")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    log = logging.getLogger("trainer")
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    if args.command == "train":
        from .train import train

        resume = args.resume_from or ("latest" if args.resume else None)
        summary = train(cfg, args.shards, args.output, resume=resume, device=args.device)
        if summary.get("stopped"):
            log.info("stopped at step %d (stop_at); continue with --resume", summary["steps"])
        else:
            log.info("done: %d steps (%d skipped); final model in %s/final", summary["steps"],
                     summary["skipped_steps"], summary["output"])
        return 0
    from .cache import cache_features

    files = cache_features(cfg, args.shards, args.out, batch_size=args.batch_size, device=args.device)
    log.info("feature cache: %d files (this rank)", len(files))
    return 0
