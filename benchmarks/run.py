"""Run every benchmark module; write BENCHMARKS.md and outputs/bench/bench.json.

Each ``benchmarks/bench_*.py`` exposes ``run() -> Section`` (see :mod:`benchmarks.common`): it
times the project's code against a baseline side by side in this one process and returns a
Markdown section plus its entries ``{name, baseline, ours, unit, ratio, target, note}``. All
entries go into one JSON list (``--json``), and into a summary table at the top of the Markdown.
A module that fails is reported (its error in the Markdown and on stderr, exit status 1) and the
others still run. The GPU section is rendered from the GPU suite's last result
(``benchmarks/results/gpu.json``, written by ``python -m benchmarks.gpu``), when there is one.

``--only NAME`` runs one module (and then leaves the other modules' entries out of the JSON).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path

import benchmarks
from benchmarks.common import Entry, Section, entry_table, machine

ROOT = Path(__file__).resolve().parents[1]
GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"


def module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def run_module(name: str) -> Section:
    """Import and run one module; a plain-string result becomes a section without entries."""
    out = importlib.import_module(f"benchmarks.{name}").run()
    if isinstance(out, str):
        return Section(out)
    if not isinstance(out, Section):
        raise TypeError(f"benchmarks.{name}.run() returned {type(out).__name__}, not a Section or str")
    return out


def gpu_section(path: Path = GPU_RESULTS) -> str:
    """The GPU suite's Markdown from its saved JSON, or how to produce it."""
    from benchmarks.gpu.report import BEGIN, END, render

    if path.is_file():
        return render(json.loads(path.read_text()))
    return (f"{BEGIN}\n## GPU suite (`benchmarks/gpu`)\n\nNot run on a GPU yet. On a machine with one GPU: "
            "`python -m benchmarks.gpu --out outputs/bench/gpu` (under 8 minutes on an H100/H200-class GPU), "
            f"then copy `outputs/bench/gpu/gpu.json` to `{GPU_RESULTS.relative_to(ROOT)}` and run "
            "`python -m benchmarks.gpu --render benchmarks/results/gpu.json --markdown BENCHMARKS.md` "
            f"(`make bench-gpu` does all three).\n{END}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS.md", help="Markdown file to write (default: BENCHMARKS.md)")
    ap.add_argument("--json", default="outputs/bench/bench.json", help="JSON entries (default: outputs/bench/bench.json)")
    ap.add_argument("--only", action="append", default=[], help="run only these modules (e.g. bench_pipeline)")
    args = ap.parse_args(argv)
    names = module_names()
    unknown = set(args.only) - set(names)
    if unknown:
        ap.error(f"--only: no module {sorted(unknown)}; modules are {names}")
    if args.only:
        names = [n for n in names if n in args.only]
    t_all = time.perf_counter()
    box = machine()
    sections: list[str] = []
    entries: list[Entry] = []
    failed = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            section = run_module(name)
        except Exception as e:  # one broken module must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            sections.append(f"## `{name}`\n\nFailed: `{type(e).__name__}: {e}`")
            continue
        sections.append(section.markdown.strip())
        entries.extend(section.entries)
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_all
    header = (f"# Benchmarks\n\nMade by `make bench` (`python -m benchmarks.run`) on {platform.machine()}, "
              f"{platform.processor() or 'cpu'}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}, "
              f"in {elapsed / 60:.1f} minutes. Machine: {box.describe()}. Every figure below comes from that run "
              "(the GPU section from the GPU suite's run, named there). Ratios compare baseline and ours side by "
              f"side in one process; `ratio` = how many times better ours is. JSON: `{args.json}`.\n")
    summary = "## Summary\n\n" + "\n".join(entry_table(entries))
    Path(args.out).write_text("\n\n".join([header, summary, *sections, gpu_section().strip()]) + "\n")
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps([e.to_dict() for e in entries], indent=2) + "\n")
    (json_path.parent / "machine.json").write_text(json.dumps(vars(box), indent=2) + "\n")
    print(f"wrote {args.out} and {args.json} ({len(entries)} entries) in {elapsed:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
