"""Timing, FLOP counting, peak memory and the record file of one model's child process.

Every measurement becomes one JSON line (written and flushed at once, so a child killed at its
budget keeps what it measured): ``{model, what, batch, compiled, images, items, item, median_s,
times, flops, peak_mem_gb, note}`` or, when it could not run, ``{..., error}`` / ``{..., skipped}``.
FLOPs are counted once per shape on the eager model with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; gathers and ``grid_sample`` are not FLOPs there); the compiled
model is credited the same count. The report divides by the bf16 matmul rate measured first in the
same run (:func:`matmul_peak`) to get the model FLOP utilisation.
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder:
    """Appends one JSON line per measurement for ``model``; knows the child's deadline."""

    def __init__(self, path: Path, model: str, deadline: float, device: torch.device):
        self.path, self.model, self.deadline, self.device = Path(path), model, deadline, device

    def left(self) -> float:
        return self.deadline - time.time()

    def write(self, **fields: Any) -> dict[str, Any]:
        rec = {"model": self.model, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def measure(self, what: str, batch: int, fn: Callable[[], Any], *, images: float, items: float | None = None,
                item: str = "images", compiled: bool = False, flops: float | None = None, warmup: int = 1,
                iters: int = 3, note: str = "") -> dict[str, Any] | None:
        """Warm up, count FLOPs (eager only, unless given), time ``iters`` calls; errors are recorded.

        ``images`` and ``items`` are per call (a generate of 32 sequences with 3 prompts per image is
        32 items and 32/3 images). Returns the record, or None when it failed or was skipped.
        """
        base = {"what": what, "batch": batch, "compiled": compiled, "images": images,
                "items": images if items is None else items, "item": item, "note": note}
        if self.left() <= 0:
            self.write(**base, skipped="model budget spent")
            return None
        try:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(max(warmup, 1) if compiled else warmup):  # compiling is not throughput
                fn()
            sync(self.device)
            if flops is None and not compiled:
                flops = count_flops(fn)
            times = []
            for _ in range(iters):
                if self.left() <= 0 and times:
                    break
                t = time.perf_counter()
                fn()
                sync(self.device)
                times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            return self.write(**base, median_s=statistics.median(times), times=times, flops=flops, peak_mem_gb=peak)
        except Exception as e:  # one failing shape (out of memory, a compile error) must not end the model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.write(**base, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                       trace=traceback.format_exc()[-2000:])
            return None


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, iters: int = 10) -> dict[str, Any]:
    """Best-of rate of ``n x n @ n x n`` in ``dtype`` (FLOP/s): the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "best_s": min(times), "median_s": statistics.median(times),
            "flops_per_s": 2 * n ** 3 / min(times)}


def compile_kwargs(backend: str, mode: str | None) -> dict[str, Any]:
    """torch.compile arguments: ``mode`` only means something to inductor."""
    return {"backend": backend, **({"mode": mode} if mode and backend == "inductor" else {})}
