"""Segment pooling: the USE head's batched area-weighted average against a per-segment loop.

``pool-10/100/1000``: S segments on a batch of 8 images at the real model's sizes (24x24 grid,
merged features of width 1024, fp32 on this CPU). Area weights are real ones: random ellipse masks
on 640x480 images through :func:`trainer.model.area_weights.area_weights`, so each row is sparse the
way a segment is (it touches a few dozen of the 576 patches). Both sides get the same patch maps,
dense weights ``[S, 576]`` and image indices, and return ``[S, 1024]``; the results are asserted
equal. Ours: :func:`trainer.model.use_model.pool_segments` (one ``embedding_bag`` over the non-zero
weights, the conversion from dense weights included in its time); baseline: ``weights[s] @
patches[image(s)]`` for each segment. Also timed for the table: the former implementation, one
``bmm`` over per-image zero-padded dense weight blocks.

One torch thread on both sides (restored afterwards). On this 2-core machine shared with other jobs,
an OpenMP parallel region waits for whichever of its threads the OS has descheduled: with two
threads ``pool_segments`` measured 36 ms median at 100 segments under a load of 5 and 1.1 ms with
one, while the loop's small gemvs run on one thread either way. Two threads would measure the
machine's load, not the code; both sides stream rows from cache, where a second core adds little.

Bound, from this run's own measurements: pooling is a stream of patch rows (4 KB each) with a
multiply-add per float, so it is bound by the rate at which rows are read. The loop reads one
image's whole map per segment (``S x 576`` rows); ours reads the rows under each segment
(``nnz`` rows). The read rate is measured here on the same patch maps (a full reduction over them),
so both bounds use the same rate and their quotient is ``576 / mean nnz per row``: how much better
than the loop any exact method that reads each covered row once per segment can be. (Rows covered
by several segments of one image could be read once per image instead, a scatter that no torch op
does faster here: ``torch.sparse.mm`` in CSR, CSC and COO layouts measured 2-4x slower than the bag.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import Entry, Section, compare, entry_table, machine, measure
from trainer.model.area_weights import area_weights
from trainer.model.use_model import pool_segments

B, GRID, DIM, H, W = 8, 24, 1024, 480, 640
SIZES = ((10, 31), (100, 21), (1000, 5))  # (segments, repeats)


def distinct_weights(k: int = 128, seed: int = 0) -> torch.Tensor:
    """Area weights ``[k, GRID * GRID]`` of ``k`` random ellipses on a 640x480 image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    masks = np.zeros((k, H, W), dtype=bool)
    for s in range(k):
        cx, cy = rng.integers(0, W), rng.integers(0, H)
        rx, ry = rng.integers(8, 160, size=2)
        masks[s] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return area_weights(torch.from_numpy(masks), GRID)


def pool_loop(patches: torch.Tensor, weights: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    return torch.stack([weights[s] @ patches[int(image_index[s])] for s in range(weights.shape[0])])


def pool_bmm(patches: torch.Tensor, weights: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """The former ``pool_segments``: segments laid out per image in a zero-padded ``[B, S_max, P]``
    block (slot = rank among its image's segments) and one dense ``bmm`` with the patches."""
    b, p, _ = patches.shape
    s = weights.shape[0]
    counts = torch.bincount(image_index, minlength=b)
    order = torch.argsort(image_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(s) - starts[image_index[order]]
    block = patches.new_zeros(b, int(counts.max()), p)
    block[image_index, slot] = weights
    return torch.bmm(block, patches)[image_index, slot]


def _profile_rows(fn, top: int = 5) -> list[str]:
    """torch.profiler of one call: the ops with the most self CPU time, as Markdown rows."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = ["| op | calls | self CPU (ms) | share |", "|---|---:|---:|---:|"]
    rows += [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1000:.3f} | {e.self_cpu_time_total / total:.0%} |"
             for e in events[:top]]
    return rows


def run() -> Section:
    box = machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(box)
    finally:
        torch.set_num_threads(threads)


def _run(box) -> Section:
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(B, GRID * GRID, DIM, generator=gen)
    row_bytes = DIM * 4
    with torch.no_grad():
        read = measure(lambda: patches.sum(), repeat=21, warmup=2)  # one pass over the maps: the row read rate
    read_gbps = patches.numel() * 4 / read.median / 1e9
    entries, rows = [], ["| segments | nnz per row | loop (ms) | `pool_segments` (ms) | dense padded bmm (ms) | "
                         "covered rows per image | loop read (MB) | ours read (MB) | loop GB/s | ours GB/s | loop bound (ms) | "
                         "ours bound (ms) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    distinct = distinct_weights()
    profiled: list[str] = []
    with torch.no_grad():
        for n, repeat in SIZES:
            weights = distinct[torch.randint(0, len(distinct), (n,), generator=gen)]
            index = torch.randint(0, B, (n,), generator=gen)
            base, ours = compare(lambda w=weights, i=index: pool_loop(patches, w, i),
                                 lambda w=weights, i=index: pool_segments(patches, w, i), repeat=repeat)
            torch.testing.assert_close(ours.result, base.result, rtol=1e-4, atol=1e-5)
            dense = measure(lambda w=weights, i=index: pool_bmm(patches, w, i), repeat=max(3, repeat // 3), warmup=1)
            torch.testing.assert_close(dense.result, base.result, rtol=1e-4, atol=1e-5)
            nnz = int((weights > 0).sum())
            union = sum(int((weights[index == b] > 0).any(0).sum()) for b in range(B))  # covered rows per image
            loop_bytes, ours_bytes = n * GRID * GRID * row_bytes, nnz * row_bytes
            loop_bound, ours_bound = loop_bytes / read_gbps / 1e6, ours_bytes / read_gbps / 1e6  # ms
            loop_gbps, ours_gbps = loop_bytes / base.median / 1e9, ours_bytes / ours.median / 1e9
            s_max = int(torch.bincount(index, minlength=B).max())
            union_bytes = union * row_bytes
            union_bound = union_bytes / read_gbps / 1e6
            target_note = (f"; 20x needs ours at {base.median * 1000 / 20:.2f} ms" + (
                ", below the read bound of reading covered rows per segment" if base.median / 20 < ours_bound / 1000
                else "") if n == 100 else "")
            bmm_bound = box.flops_bound_s(2 * B * s_max * GRID * GRID * DIM) * 1000
            entries.append(Entry.cost(
                f"pool-{n}", base.median * 1000, ours.median * 1000, "ms", 20.0 if n == 100 else None,
                f"{n} segments on {B} images, grid {GRID}, width {DIM}, fp32 CPU, 1 thread each, same inputs and outputs (asserted); "
                f"ours {ours.spread('ms', 1000)}, loop {base.spread('ms', 1000)}. Bound: rows read, over this run's "
                f"read rate of the same maps ({read_gbps:.1f} GB/s, one thread): the loop reads "
                f"{loop_bytes / 1e6:.0f} MB (>= {loop_bound:.2f} ms; {loop_gbps:.1f} GB/s achieved), ours the "
                f"{nnz / n:.0f} covered rows per segment, {ours_bytes / 1e6:.1f} MB (>= {ours_bound:.2f} ms; "
                f"{ours_gbps:.1f} GB/s achieved): at most {base.median * 1000 / ours_bound:.1f}x the measured loop, "
                f"{GRID * GRID * n / nnz:.1f}x (576 / nnz) at equal read rates. Reading each covered row once per "
                f"image instead ({union} rows, {union_bytes / 1e6:.1f} MB, >= {union_bound:.2f} ms) would allow "
                f"{base.median * 1000 / union_bound:.1f}x, but takes a scatter kernel torch lacks (sparse.mm in "
                f"CSR/CSC/COO measured 2-4x slower than the bag){target_note}; dense padded bmm "
                f"{dense.median * 1000:.2f} ms ({2 * B * s_max * GRID * GRID * DIM / 1e9:.2f} GFLOP, >= "
                f"{bmm_bound:.2f} ms at the measured matmul rate)"))
            rows.append(f"| {n} | {nnz / n:.0f} | {base.median * 1000:.2f} | {ours.median * 1000:.2f} | "
                        f"{dense.median * 1000:.2f} | {union / B:.0f} | {loop_bytes / 1e6:.0f} | {ours_bytes / 1e6:.1f} | "
                        f"{loop_gbps:.1f} | {ours_gbps:.1f} | {loop_bound:.2f} | {ours_bound:.2f} |")
            if n == 100:
                profiled = _profile_rows(lambda w=weights, i=index: pool_segments(patches, w, i))
    md = "\n".join([
        "## Segment pooling (`benchmarks/bench_pool.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_pool`).", "",
        *entry_table(entries), "",
        f"Area-weighted patch averages for S segments on {B} images (24x24 grid of width {DIM}, the real model's "
        "merged features), real area weights of random ellipse masks, one torch thread on both sides (see the "
        "module's docstring why). Baseline: one `weights[s] @ patches[image]` "
        "per segment; ours: `trainer.model.use_model.pool_segments` (one `F.embedding_bag` with per-sample weights "
        "over the non-zero weights, dense-to-sparse conversion included); also timed: the former dense form, one "
        "`bmm` over zero-padded per-image weight blocks. Both sides stream 4 KB patch rows and do one multiply-add "
        "per float read: bounds are bytes read over the read rate of the same patch maps measured in this run "
        f"({read_gbps:.1f} GB/s on one thread; {box.describe()}).", "", *rows, "",
        "torch.profiler of one `pool_segments` call at 100 segments (the bag is the work; the rest is the "
        "dense-to-sparse conversion):", "", *profiled,
    ])
    return Section(md, entries)
