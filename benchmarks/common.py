"""What every benchmark module shares: result entries, repeated side-by-side timing, machine bounds.

A benchmark module ``benchmarks/bench_*.py`` exposes ``run() -> Section``: the Markdown it adds to
``BENCHMARKS.md`` and its :class:`Entry` rows for ``outputs/bench/bench.json``. (A module may also
return a plain Markdown string, then it has no JSON entries.) Baseline and ours are always measured
in the same process, interleaved run by run (:func:`compare`), so a load spike on this shared
machine hits both; figures are medians and the spread goes into the entry's note.

Physical bounds are measured once per run (:func:`machine`): the fp32 matmul rate (torch) and the
memory copy bandwidth (numpy), so a note can say how far a figure is from what the machine can do.
"""

from __future__ import annotations

import cProfile
import functools
import io
import math
import os
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Entry:
    """One row of ``bench.json``.

    ``ratio`` is how many times better ours is than the baseline: ``baseline / ours`` for costs
    (seconds, ms), ``ours / baseline`` for rates (items per second). ``target`` is the ratio to reach
    (None: no target, the figure is informative).
    """

    name: str
    baseline: float
    ours: float
    unit: str
    ratio: float
    target: float | None
    note: str

    @classmethod
    def cost(cls, name: str, baseline: float, ours: float, unit: str, target: float | None, note: str) -> Entry:
        return cls(name, baseline, ours, unit, baseline / ours if ours > 0 else math.inf, target, note)

    @classmethod
    def rate(cls, name: str, baseline: float, ours: float, unit: str, target: float | None, note: str) -> Entry:
        return cls(name, baseline, ours, unit, ours / baseline if baseline > 0 else math.inf, target, note)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class Section:
    """A benchmark module's output: Markdown for ``BENCHMARKS.md`` and its JSON entries."""

    markdown: str
    entries: list[Entry] = field(default_factory=list)


@dataclass
class Timing:
    """Wall times (s) of repeated runs of one function."""

    times: list[float]
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def spread(self, unit: str = "s", scale: float = 1.0, digits: int = 4) -> str:
        lo, hi = min(self.times) * scale, max(self.times) * scale
        return f"median of {len(self.times)} (range {lo:.{digits}g}-{hi:.{digits}g} {unit})"


def measure(fn: Callable[[], Any], repeat: int, warmup: int = 0) -> Timing:
    """Run ``fn`` ``warmup + repeat`` times; the last result is kept."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return Timing(times, out)


def compare(baseline: Callable[[], Any], ours: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple[Timing, Timing]:
    """Time both side by side, alternating run by run, after ``warmup`` untimed runs of each."""
    for _ in range(warmup):
        baseline()
        ours()
    base, mine = Timing([]), Timing([])
    for _ in range(repeat):
        for fn, timing in ((baseline, base), (ours, mine)):
            t = time.perf_counter()
            timing.result = fn()
            timing.times.append(time.perf_counter() - t)
    return base, mine


@dataclass
class Machine:
    """Measured bounds of this machine (medians of a few runs)."""

    cpus: int
    torch_threads: int
    matmul_gflops: float  # fp32, 2048 x 2048 @ 2048 x 2048
    copy_gbps: float  # bytes read + written per second, 256 MiB numpy copy

    def flops_bound_s(self, flops: float) -> float:
        return flops / (self.matmul_gflops * 1e9)

    def bytes_bound_s(self, nbytes: float) -> float:
        return nbytes / (self.copy_gbps * 1e9)

    def describe(self) -> str:
        return (f"{self.cpus} CPUs ({self.torch_threads} torch threads), fp32 matmul {self.matmul_gflops:.0f} GFLOP/s, "
                f"memory copy {self.copy_gbps:.1f} GB/s (read + write)")


@functools.lru_cache(maxsize=1)
def machine() -> Machine:
    """Measure the matmul rate and copy bandwidth once per process."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = measure(lambda: torch.mm(a, b), repeat=5, warmup=1)
    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    cp = measure(lambda: np.copyto(dst, src), repeat=5, warmup=1)
    return Machine(cpus=os.cpu_count() or 1, torch_threads=torch.get_num_threads(),
                   matmul_gflops=2 * n ** 3 / mm.median / 1e9, copy_gbps=2 * src.nbytes / cp.median / 1e9)


def profile_table(fn: Callable[..., Any], *args: Any, top: int = 6) -> list[str]:
    """cProfile of one call of ``fn(*args)``: the ``top`` functions by own time, as Markdown rows.

    C extension calls (pycocotools, numpy) show as builtins or inside their Python caller.
    """
    prof = cProfile.Profile()
    prof.runcall(fn, *args)
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = stats.total_tt
    rows = [f"cProfile of one call ({total:.3f} s under the profiler), top {top} by own time:", "",
            "| function | calls | own time (s) | share |", "|---|---:|---:|---:|"]
    for (file, line, name), (_, ncalls, tottime, _, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        rows.append(f"| `{where}` | {ncalls} | {tottime:.4f} | {tottime / total:.0%} |")
    return rows


def entry_table(entries: list[Entry]) -> list[str]:
    """Markdown table of entries (the same figures as ``bench.json``)."""
    rows = ["| benchmark | baseline | ours | unit | ratio | target | note |", "|---|---:|---:|---|---:|---:|---|"]
    for e in entries:
        target = "-" if e.target is None else f">= {e.target:g}x {'(met)' if e.met else '(**not met**)'}"
        rows.append(f"| `{e.name}` | {_num(e.baseline)} | {_num(e.ours)} | {e.unit} | {e.ratio:.2f}x | {target} | "
                    f"{e.note} |")
    return rows


def _num(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
