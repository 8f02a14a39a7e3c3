"""``python -m pipeline`` (also ``use-pipeline``): curate a dataset into shards, show configs, download
model weights, make synthetic data.

    python -m pipeline curate --config coco-annotations --images DIR --annotations instances.json
        [--captions captions.json] --output OUT [shards.max_samples=100 grounder.box_threshold=0.3 ...]
    python -m pipeline config show coco [key=value ...]
    python -m pipeline models download --config coco --cache DIR
    python -m pipeline models convert-sam CHECKPOINT OUT_DIR
    python -m pipeline synth --help

``--config`` takes a path or the name of a bundled config (``pipeline/configs/NAME.yaml``).
Exit codes: 0 done (per-image failures are in ``OUT/failures.parquet``); 1 the job ran but no input
became a sample; 2 bad config, annotation file, missing weights or an output directory that belongs
to another job (nothing was written); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

from pipeline import sam_convert
from shards import interrupt

_FLAGS = {"images": "images", "annotations": "annotations", "captions": "captions", "regions": "regions"}
INTERRUPTED = "interrupted; rerun the same command to resume"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("use-segments")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


def _parser(prog: str = "python -m pipeline") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    cur = sub.add_parser("curate", help="run (or resume) a curation job into an output directory",
                         description="Run a curation job; rerunning the same command resumes it.")
    cur.add_argument("--config", required=True, help="job YAML: a path or a bundled name (coco, vg, folder, "
                                                     "coco-annotations, demo)")
    cur.add_argument("--images", help="image directory (source.images); a path, s3://bucket/prefix or gs://...")
    cur.add_argument("--annotations", help="COCO instances JSON or VG image_data.json (source.annotations); a "
                                           "path or an s3:// / gs:// URL")
    cur.add_argument("--captions", help="COCO captions JSON (source.captions); a path or URL")
    cur.add_argument("--regions", help="VG region_descriptions.json (source.regions); a path or URL")
    cur.add_argument("--output", "--out", dest="output", required=True,
                     help="output directory (or s3:// / gs:// prefix): shards, manifest, failures, summary; "
                          "credentials come from the usual AWS / Google environment and config")
    cur.add_argument("--overwrite", action="store_true",
                     help="replace what another job (or an earlier run) wrote into --output and start afresh")
    cur.add_argument("--retry-failed", action="store_true",
                     help="retry every input that failed in earlier runs (environment failures such as a "
                          "missing file are always retried)")
    cur.add_argument("--no-progress", action="store_true", help="no progress bar")
    cur.add_argument("--verbose", action="store_true", help="show Ray's start-up and worker logs")
    cur.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    cfg = sub.add_parser("config", help="job configs").add_subparsers(dest="config_command", required=True)
    show = cfg.add_parser("show", help="print the resolved config with every key and its description")
    show.add_argument("config", help="a path or a bundled config name")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    models = sub.add_parser("models", help="model weights").add_subparsers(dest="models_command", required=True)
    dl = models.add_parser("download", help="fetch the configured weights into a local cache (needs internet)")
    dl.add_argument("--config", help="job YAML (path or bundled name) whose stages' weights to fetch "
                                     "(default: every stage)")
    dl.add_argument("--cache", help="directory to download into (default: the Hugging Face cache)")
    dl.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (e.g. a model)")
    sam_convert.add_arguments(models.add_parser(
        "convert-sam", help="convert an official SAM checkpoint (sam_vit_*.pth) to a transformers model directory",
        description=sam_convert.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("synth", help="write the synthetic dataset (see `python -m pipeline synth --help`)",
                   add_help=False)
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line; Ctrl-C anywhere is one line and exit 130 (a rerun resumes), never a traceback."""
    if threading.current_thread() is threading.main_thread():
        interrupt.install(INTERRUPTED)  # Ctrl-C ends the job even if Ray's driver swallows the interrupt
    try:
        return _main(argv, prog)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def _main(argv: list[str] | None, prog: str | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # its own parser owns every flag after the subcommand
        from pipeline import synth

        return int(synth.main(argv[1:]) or 0)
    args = _parser(prog or _prog()).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.config import ConfigError, describe, load_config

    try:
        if args.command == "config":
            print("\n".join(describe(load_config(args.config, args.overrides))))
            return 0
        if args.command == "models" and args.models_command == "convert-sam":
            return sam_convert.run(args)
        if args.command == "models":
            from pipeline import models

            cfg = load_config(args.config, args.overrides) if args.config else None
            print(json.dumps(models.download(cfg, args.cache), indent=1))
            return 0
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _curate(args)


def _prog() -> str:
    """``use-pipeline`` when run as the console script, else ``python -m pipeline``."""
    name = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else ""
    return name if name.startswith("use-") else "python -m pipeline"


def _curate(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.job import JobFailed, JobRefused, run_job
    from pipeline.models import ModelNotFoundError
    from pipeline.sources import SourceError

    overrides = [f"source.{key}={getattr(args, flag)}" for flag, key in _FLAGS.items() if getattr(args, flag)]
    try:
        cfg = load_config(args.config, [*args.overrides, *overrides])
        summary = run_job(cfg, args.output, progress=not args.no_progress, overwrite=args.overwrite,
                          retry_failed=args.retry_failed, config_name=args.config, overrides=args.overrides,
                          verbose=args.verbose)
    except (ConfigError, SourceError, ModelNotFoundError, JobRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0
