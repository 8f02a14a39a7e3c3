"""``python -m shards`` / ``use-shards``: validate, summarize and inspect a shard directory.

A command that writes files takes ``--output`` (the spelling of every CLI of the project; ``--out``
is kept as an alias), and ``--version`` prints the installed version. Results go to stdout (problem
lines, JSON) so that they can be piped; progress and logs go to
stderr. ``validate`` exits 1 when it finds any problem, so that CI and job scripts can gate on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("shards")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status (0 ok, 1 problems found, 2 usage error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.run(args)


def version() -> str:
    """The installed distribution's version (``use-segments``), or a marker when run from a bare checkout."""
    try:
        return dist_version("use-segments")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


def _prog() -> str:
    """``use-shards`` when run through the console script, else ``python -m shards``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name == "use-shards" else "python -m shards"


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or _prog(),
                                     description="Validate, summarize and inspect a USE shard directory.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{validate,stats,inspect,browse}")

    p = sub.add_parser("validate", help="check every shard; one line per problem, exit 1 if any",
                       description="Check every *.tar in DIR: tar integrity, member names and types, the JSON "
                                   "schema, image size, RLEs, bbox/area against the masks, texts, stats files. "
                                   "Prints 'SHARD KEY: message' per problem and a count; exits 1 if any.")
    p.add_argument("dir", type=_location, help="shard directory, or an s3:// / gs:// prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_validate)

    p = sub.add_parser("stats", help="JSON summary of a shard directory",
                       description="Print a JSON summary: shards, images, segments, texts, failures, segments "
                                   "per image, texts per segment, text and image sources.")
    p.add_argument("dir", type=_location, help="shard directory, or an s3:// / gs:// prefix")
    p.set_defaults(run=_stats)

    p = sub.add_parser("inspect", help="PNG overlays of samples' segments and texts",
                       description="Write OUTPUT/KEY.png for each sample: its segments as coloured masks with "
                                   "outlines, labels beside them (leader lines where crowded) and a legend of "
                                   "every segment's texts.")
    p.add_argument("dir", type=_location, help="shard directory, or an s3:// / gs:// prefix")
    p.add_argument("--output", "--out", dest="output", type=Path, required=True,
                   help="output directory for the PNGs (--out is an alias)")
    p.add_argument("--limit", type=_positive, default=None, help="render only the first N samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("browse", help="a static HTML browser of the samples, masks, texts and stats",
                       description="Write SITE/index.html and its data: a paginated grid of samples with their "
                                   "masks, segment texts on hover/click, text search, source and area filters, "
                                   "stats histograms and failures. Opens from disk; no server or network.")
    p.add_argument("dir", type=_location, help="shard directory, or an s3:// / gs:// prefix")
    p.add_argument("--output", "--out", dest="output", type=Path, required=True,
                   help="site directory, index.html is written there (--out is an alias)")
    p.add_argument("--limit", type=_positive, default=None, help="only the first N samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_browse)
    return parser


def _location(value: str) -> Path | str:
    """A local path as a ``Path``; an ``s3://`` / ``gs://`` URL kept as it is (``Path`` would fold its ``//``)."""
    from .storage import is_remote

    return value.rstrip("/") if is_remote(value) else Path(value)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _validate(args: argparse.Namespace) -> int:
    from .storage import isdir
    from .validate import iter_problems, shard_files

    problems, files = 0, set()
    for problem in iter_problems(args.dir, progress=not args.no_progress):
        problems += 1
        files.add(problem.shard)
        tqdm.write(str(problem), file=sys.stdout)
    n = len(shard_files(args.dir)) if isdir(args.dir) else 0
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

    if not ((isinstance(args.dir, Path) and args.dir.is_file()) or list_shards(args.dir)):
        log.error("no shards (*-NNNNNN.tar) in %s", args.dir)
        return 2
    paths = inspect(args.dir, args.output, limit=args.limit, progress=not args.no_progress)
    print(f"wrote {len(paths)} overlay(s) to {args.output}")
    return 0


def _browse(args: argparse.Namespace) -> int:
    from .browse.site import build_site

    try:
        res = build_site(args.dir, args.output, limit=args.limit, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(f"wrote a browser of {res['samples']} samples ({res['segments']} segments, {res['bytes'] / 1e6:.1f} MB): "
          f"open {res['path'].resolve()}")
    return 0
