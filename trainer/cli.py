"""``python -m trainer``: train USE on shards, or cache the frozen backbones' features.

    python -m trainer train --config trainer/configs/demo.yaml --shards DIR --output DIR [--resume | --resume-from CKPT | --overwrite] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m trainer train ...      # DDP, one process per GPU (gloo on CPU)
    python -m trainer cache-features --config CFG --shards DIR [--output DIR]

Overrides are dotted config keys with YAML values: ``steps=200 data.batch_size=16 optim.lr=1e-4``.
Exit status: 0 done, 1 the run failed (every step skipped, non-finite weights), 2 bad input (one
line per problem, nothing written), 130 interrupted (rerun with --resume to continue).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from importlib.metadata import PackageNotFoundError, version

from shards import interrupt

from .config import TrainConfig
from .errors import InputError, TrainingFailed

PROG = os.path.basename(sys.argv[0]) if os.path.basename(sys.argv[0]) == "use-trainer" else "python -m trainer"


def _version() -> str:
    try:
        return version("use-segments")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


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
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the segment embedding head (torchrun for several processes)",
                       description="Train USE on shards. Writes OUTPUT/final (config.json + model.safetensors), "
                                   "OUTPUT/checkpoints, OUTPUT/tensorboard and OUTPUT/metrics.jsonl.")
    _common(t)
    t.add_argument("--output", "--out", dest="output", required=True,
                   help="run directory (checkpoints, logs, final model)")
    how = t.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT/checkpoints/latest (falling back past broken checkpoints); "
                          "starts fresh with a warning when there is none")
    how.add_argument("--resume-from", default=None, metavar="CKPT", help="continue from this checkpoint directory")
    how.add_argument("--overwrite", action="store_true",
                     help="start afresh in an OUTPUT that holds an earlier run (its run files are removed)")
    c = sub.add_parser("cache-features", help="compute the frozen backbone features once, beside the shards",
                       description="Writes PREFIX-NNNNNN.features.safetensors per shard (cache_dtype of the config). "
                                   "Train from it with use_feature_cache=true.")
    _common(c)
    c.add_argument("--output", "--out", dest="output", default=None,
                   help="cache directory (default: config cache_dir, else the shards dir)")
    c.add_argument("--batch-size", type=int, default=32, help="images per backbone forward")
    return ap


def _check_inputs(args: argparse.Namespace) -> tuple[TrainConfig | None, list[str]]:
    """Every input problem at once (config, model config, shards, stats, samples), one line each."""
    from .data import steps_per_epoch
    from .train import shard_list

    errors: list[str] = []
    cfg = None
    try:
        cfg = TrainConfig.from_yaml(args.config, args.overrides)
        cfg.model_source()
    except InputError as e:
        errors.append(str(e))
    urls = None
    try:
        urls = shard_list(args.shards)
    except InputError as e:
        errors.append(str(e))
    if cfg is not None and (args.command == "cache-features" or cfg.use_feature_cache):
        from .cache import cache_dir_for

        try:
            cache_dir_for((args.output or cfg.cache_dir) if args.command == "cache-features" else cfg.cache_dir,
                          args.shards)
        except InputError as e:
            errors.append(str(e))
    if cfg is not None and urls is not None and args.command == "train":
        try:
            steps_per_epoch(cfg.data, urls, int(os.environ.get("WORLD_SIZE", "1")))
        except InputError as e:
            errors.append(str(e))
    return cfg, errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    log = logging.getLogger("trainer")
    hint = "rerun with --resume to continue from the last checkpoint" if args.command == "train" \
        else "rerun the same command to resume (finished shards are kept)"
    if threading.current_thread() is threading.main_thread():
        interrupt.install(f"interrupted; {hint}")  # Ctrl-C ends the run even if the interrupt is swallowed
    try:
        cfg, errors = _check_inputs(args)
        if errors:
            for e in errors:
                print(f"error: {e}", file=sys.stderr)
            return 2
        if args.command == "train":
            return _train(args, cfg, log)
        from .cache import cache_features

        files = cache_features(cfg, args.shards, args.output, batch_size=args.batch_size, device=args.device)
        log.info("feature cache: %d files (this rank)", len(files))
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; {hint}", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace, cfg: TrainConfig, log: logging.Logger) -> int:
    from .train import train

    resume = args.resume_from or ("latest" if args.resume else None)
    summary = train(cfg, args.shards, args.output, resume=resume, device=args.device, overwrite=args.overwrite)
    if summary.get("stopped"):
        log.info("stopped at step %d (stop_at); continue with --resume", summary["steps"])
    else:
        log.info("done: %d steps (%d skipped); final model in %s/final", summary["steps"],
                 summary["skipped_steps"], summary["output"])
    return 0
