"""``python -m pipeline``: curate a dataset into shards, download model weights, make synthetic data.

    python -m pipeline curate --config pipeline/configs/coco-annotations.yaml
        --images DIR --annotations instances.json [--captions captions.json] --output OUT
        [shards.max_samples=100 grounder.box_threshold=0.3 ...]
    python -m pipeline models download [--config CFG] [--cache DIR]
    python -m pipeline synth --help

Exit codes: 0 done (per-image failures are in ``OUT/failures.parquet``), 2 bad config or
annotation file (nothing was written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

_FLAGS = {"images": "images", "annotations": "annotations", "captions": "captions", "regions": "regions"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cur = sub.add_parser("curate", help="run (or resume) a curation job into an output directory",
                         description="Run a curation job; rerunning the same command resumes it.")
    cur.add_argument("--config", required=True, help="job YAML (pipeline/configs/*.yaml)")
    cur.add_argument("--images", help="image directory (source.images)")
    cur.add_argument("--annotations", help="COCO instances JSON or VG image_data.json (source.annotations)")
    cur.add_argument("--captions", help="COCO captions JSON (source.captions)")
    cur.add_argument("--regions", help="VG region_descriptions.json (source.regions)")
    cur.add_argument("--output", required=True, help="output directory: shards, manifest, failures, summary")
    cur.add_argument("--no-progress", action="store_true", help="no progress bar")
    cur.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    models = sub.add_parser("models", help="model weights").add_subparsers(dest="models_command", required=True)
    dl = models.add_parser("download", help="fetch the configured weights into a local cache (needs internet)")
    dl.add_argument("--config", help="job YAML whose stages' weights to fetch (default: every stage)")
    dl.add_argument("--cache", help="directory to download into (default: the Hugging Face cache)")
    sub.add_parser("synth", help="write the synthetic dataset (see `python -m pipeline synth --help`)",
                   add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # its own parser owns every flag after the subcommand
        from pipeline import synth

        return int(synth.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "models":
        from pipeline import models
        from pipeline.config import load_config

        try:
            cfg = load_config(args.config) if args.config else None
            print(json.dumps(models.download(cfg, args.cache), indent=1))
        except (ValueError, RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return _curate(args)


def _curate(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.job import run_job
    from pipeline.models import ModelNotFoundError
    from pipeline.sources import SourceError

    overrides = [f"source.{key}={getattr(args, flag)}" for flag, key in _FLAGS.items() if getattr(args, flag)]
    try:
        cfg = load_config(args.config, [*args.overrides, *overrides])
        summary = run_job(cfg, args.output, progress=not args.no_progress)
    except (ConfigError, SourceError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0
