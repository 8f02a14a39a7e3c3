"""``python -m shards`` / ``use-shards``: validate, summarize and inspect a shard directory.

Results go to stdout (problem lines, JSON) so that they can be piped; progress and logs go to
stderr. ``validate`` exits 1 when it finds any problem, so that CI and job scripts can gate on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("shards")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status (0 ok, 1 problems found, 2 usage error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards",
                                     description="Validate, summarize and inspect a USE shard directory.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{validate,stats,inspect}")

    p = sub.add_parser("validate", help="check every shard; one line per problem, exit 1 if any",
                       description="Check every *.tar in DIR: tar integrity, member names and types, the JSON "
                                   "schema, image size, RLEs, bbox/area against the masks, texts, stats files. "
                                   "Prints 'SHARD KEY: message' per problem and a count; exits 1 if any.")
    p.add_argument("dir", type=Path, help="shard directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_validate)

    p = sub.add_parser("stats", help="JSON summary of a shard directory",
                       description="Print a JSON summary: shards, images, segments, texts, failures, segments "
                                   "per image, texts per segment, text and image sources.")
    p.add_argument("dir", type=Path, help="shard directory")
    p.set_defaults(run=_stats)

    p = sub.add_parser("inspect", help="PNG overlays of samples' segments and texts",
                       description="Write OUT/KEY.png for each sample: its segments as coloured masks with "
                                   "outlines and labels, and a legend of every segment's texts.")
    p.add_argument("dir", type=Path, help="shard directory")
    p.add_argument("--out", type=Path, required=True, help="output directory for the PNGs")
    p.add_argument("--limit", type=_positive, default=None, help="render only the first N samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_inspect)
    return parser


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _validate(args: argparse.Namespace) -> int:
    from .validate import iter_problems, shard_files

    problems, files = 0, set()
    for problem in iter_problems(args.dir, progress=not args.no_progress):
        problems += 1
        files.add(problem.shard)
        tqdm.write(str(problem), file=sys.stdout)
    n = len(shard_files(args.dir)) if args.dir.is_dir() else 0
    if problems:
        print(f"{problems} problem(s) in {len(files)} file(s); {n} shard(s) checked in {args.dir}")
        return 1
    print(f"OK: {n} shard(s) checked in {args.dir}, no problems")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .stats import summarize

    try:
        summary = summarize(args.dir)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .overlay import inspect
    from .writer import list_shards

    if not (args.dir.is_file() or list_shards(args.dir)):
        log.error("no shards (*-NNNNNN.tar) in %s", args.dir)
        return 2
    paths = inspect(args.dir, args.out, limit=args.limit, progress=not args.no_progress)
    print(f"wrote {len(paths)} overlay(s) to {args.out}")
    return 0
