"""Segment pooling: the USE head's batched area-weighted average against a per-segment loop.

``pool-10/100/1000``: S segments on a batch of 8 images at the real model's sizes (24x24 grid,
merged features of width 1024, fp32 on this CPU). Area weights are real ones: random ellipse masks
on 640x480 images through :func:`trainer.model.area_weights.area_weights`, so each row is sparse the
way a segment is (it touches a few dozen of the 576 patches). Ours:
:func:`trainer.model.use_model.pool_segments` (one ``bmm`` over per-image padded weight blocks);
baseline: ``weights[s] @ patches[image(s)]`` for each segment. Same result asserted.

Bounds: the loop reads one image's whole patch map per segment (S x 576 x 1024 x 4 bytes over the
memory bandwidth); the batched form reads the batch's maps once and does ``2 x B x S_max x P x D``
FLOPs (over the measured matmul rate). The Markdown also times ``torch.nn.functional.embedding_bag``
with per-sample weights on the non-zero weights only, the sparse alternative.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Entry, Section, compare, entry_table, machine

B, GRID, DIM, H, W = 8, 24, 1024, 480, 640
SIZES = ((10, 15), (100, 9), (1000, 5))  # (segments, repeats)


def distinct_weights(k: int = 128, seed: int = 0) -> torch.Tensor:
    """Area weights ``[k, GRID * GRID]`` of ``k`` random ellipses on a 640x480 image."""
    from trainer.model.area_weights import area_weights

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


def pool_bag(patches: torch.Tensor, weights: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """The sparse alternative: a weighted sum of the touched patch rows per segment (``embedding_bag``)."""
    b, p, d = patches.shape
    seg, patch = weights.nonzero(as_tuple=True)
    offsets = torch.searchsorted(seg, torch.arange(weights.shape[0]))
    return F.embedding_bag(image_index[seg] * p + patch, patches.reshape(b * p, d), offsets, mode="sum",
                           per_sample_weights=weights[seg, patch])


def run() -> Section:
    from trainer.model.use_model import pool_segments

    box = machine()
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(B, GRID * GRID, DIM, generator=gen)
    entries, rows = [], ["| segments | nnz per row | loop (ms) | `pool_segments` (ms) | embedding_bag (ms) | "
                         "loop bytes bound (ms) | bmm FLOP bound (ms) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    distinct = distinct_weights()
    with torch.no_grad():
        for n, repeat in SIZES:
            weights = distinct[torch.randint(0, len(distinct), (n,), generator=gen)]
            index = torch.randint(0, B, (n,), generator=gen)
            base, ours = compare(lambda w=weights, i=index: pool_loop(patches, w, i),
                                 lambda w=weights, i=index: pool_segments(patches, w, i), repeat=repeat)
            torch.testing.assert_close(ours.result, base.result, rtol=1e-4, atol=1e-5)
            _, bag = compare(lambda: None, lambda w=weights, i=index: pool_bag(patches, w, i), repeat=repeat)
            torch.testing.assert_close(bag.result, base.result, rtol=1e-4, atol=1e-5)
            s_max = int(torch.bincount(index, minlength=B).max())
            loop_bound = box.bytes_bound_s(n * GRID * GRID * DIM * 4 / 2) * 1000  # reads only: half a copy
            bmm_bound = box.flops_bound_s(2 * B * s_max * GRID * GRID * DIM) * 1000
            entries.append(Entry.cost(
                f"pool-{n}", base.median * 1000, ours.median * 1000, "ms", 20.0 if n == 100 else None,
                f"{n} segments on {B} images, grid {GRID}, width {DIM}, fp32 CPU; ours {ours.spread('ms', 1000)}, "
                f"loop {base.spread('ms', 1000)}; bounds: loop reads {n * GRID * GRID * DIM * 4 / 1e6:.0f} MB "
                f"(>= {loop_bound:.1f} ms), bmm {2 * B * s_max * GRID * GRID * DIM / 1e9:.2f} GFLOP "
                f"(>= {bmm_bound:.1f} ms); both memory-bound, so at bandwidth the ratio is at most S/B = {n / B:.1f}x (patch maps "
                f"read per segment vs once per image); embedding_bag on non-zero weights {bag.median * 1000:.2f} ms"))
            nnz = float((weights > 0).sum(1).float().mean())
            rows.append(f"| {n} | {nnz:.0f} | {base.median * 1000:.2f} | {ours.median * 1000:.2f} | "
                        f"{bag.median * 1000:.2f} | {loop_bound:.2f} | {bmm_bound:.2f} |")
    md = "\n".join([
        "## Segment pooling (`benchmarks/bench_pool.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_pool`).", "",
        *entry_table(entries), "",
        f"Area-weighted patch averages for S segments on {B} images (24x24 grid of width {DIM}, the real model's "
        "merged features), real area weights of random ellipse masks. Baseline: one `weights[s] @ patches[image]` "
        "per segment; ours: `trainer.model.use_model.pool_segments` (one `bmm` over padded per-image blocks); "
        "also timed: `F.embedding_bag` with per-sample weights over the non-zero weights only (sparse). Bounds from "
        f"this run's machine figures ({box.describe()}).", "", *rows,
    ])
    return Section(md, entries)
