"""Run every benchmark module and write their Markdown sections into BENCHMARKS.md.

Each ``benchmarks/bench_*.py`` exposes ``run() -> str``: it times the project's code against a
baseline side by side in this one process and returns a Markdown section with the figures and the
command that made them. ``--only NAME`` runs one module.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import sys
import time
from pathlib import Path

import benchmarks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    ap.add_argument("--out", default="BENCHMARKS.md", help="Markdown file to write (default: BENCHMARKS.md)")
    ap.add_argument("--only", action="append", default=[], help="run only these modules (e.g. bench_nms)")
    args = ap.parse_args(argv)
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n in args.only]
    sections = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        sections.append(importlib.import_module(f"benchmarks.{name}").run().strip())
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    header = (f"# Benchmarks\n\nMade by `make bench` (`python -m benchmarks.run`) on {platform.machine()}, "
              f"{platform.processor() or 'cpu'}, Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}. Ratios compare runs side by side in one process.\n")
    Path(args.out).write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
