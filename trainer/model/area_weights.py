"""Segment area weights on the model's patch grid.

``w[s, p]`` is the fraction of segment ``s``'s area that lies in patch ``p`` of a ``grid x grid``
partition of the image (row-major, the ViT token order), so each row sums to 1 and
``w @ patch_features`` is the area-weighted average the USE head embeds.

Exact for any image size: patch ``i`` along an axis of ``N`` pixels covers the continuous interval
``[i N / G, (i + 1) N / G)`` and pixel ``r`` covers ``[r, r + 1)``; a pixel straddling a patch border
is split between the two patches by overlap length. This is exactly what the plain resize in
:mod:`trainer.model.transforms` does to the image, so the weights line up with the backbone's patches
whatever the original ``H, W``. The overlaps form two small matrices ``Ry [G, H]``, ``Rx [G, W]``
and the weights are ``Ry @ mask @ Rx^T`` for all segments at once (two matmuls, no loop over
segments; segments are only chunked to bound memory). Overlaps are computed in integers (units of
1/G pixel), so the partition itself carries no rounding.

A mask smaller than a patch still puts its whole weight on the patch(es) it touches. An empty mask
has no area: by default its row is all zeros (callers drop rows whose sum is 0, see
:func:`valid_rows`); ``on_empty="raise"`` raises instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

_CHUNK = 64  # segments per matmul chunk: bounds the float copy of the masks


def _overlap(n: int, grid: int, device: torch.device) -> torch.Tensor:
    """``[grid, n]`` overlap (in 1/grid pixel units) of patch i with pixel r along one axis."""
    r = torch.arange(n, device=device, dtype=torch.int64)[None, :]
    i = torch.arange(grid, device=device, dtype=torch.int64)[:, None]
    hi = torch.minimum((r + 1) * grid, (i + 1) * n)
    lo = torch.maximum(r * grid, i * n)
    return (hi - lo).clamp_min(0).to(torch.float32)


def resample_matrix(n: int, grid: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[grid, n]``: row ``i`` holds the share of output cell ``i`` covered by each of ``n`` input cells.

    Both partitions tile the same extent (cells of size ``1/n`` and ``1/grid``), so ``R @ x`` is the
    exact area average of a 1-D map ``x`` onto ``grid`` cells and ``R @ X @ R.T`` of a square 2-D map.
    The same overlaps as the segment weights: a patch feature is averaged exactly the way a mask is.
    """
    return _overlap(n, grid, device or torch.device("cpu")).to(dtype) / n


def area_weights(masks: torch.Tensor, grid: int, on_empty: Literal["zeros", "raise"] = "zeros") -> torch.Tensor:
    """``masks`` bool ``[S, H, W]`` -> float32 ``[S, grid * grid]``, each non-empty row summing to 1."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [S, H, W], got {tuple(masks.shape)}")
    s, h, w = masks.shape
    device = masks.device
    if s == 0:
        return torch.zeros(0, grid * grid, device=device)
    ry, rx = _overlap(h, grid, device), _overlap(w, grid, device)
    parts = []
    for start in range(0, s, _CHUNK):
        m = masks[start:start + _CHUNK].to(torch.float32)
        cols = (m.reshape(-1, w) @ rx.T).view(m.shape[0], h, grid)  # [s, H, G]
        parts.append(torch.matmul(ry, cols).reshape(m.shape[0], grid * grid))  # [s, G*G]
    raw = torch.cat(parts)
    total = raw.sum(dim=1, keepdim=True)
    empty = total.squeeze(1) <= 0
    if on_empty == "raise" and bool(empty.any()):
        raise ValueError(f"empty masks at rows {torch.nonzero(empty).flatten().tolist()}")
    return torch.where(total > 0, raw / total.clamp_min(1e-12), torch.zeros_like(raw))


def valid_rows(weights: torch.Tensor) -> torch.Tensor:
    """Bool ``[S]``: rows that came from non-empty masks."""
    return weights.sum(dim=1) > 0


def area_weights_from_rle(rles: Sequence[dict[str, Any]], grid: int,
                          on_empty: Literal["zeros", "raise"] = "zeros") -> torch.Tensor:
    """Same as :func:`area_weights` for COCO RLEs (``{"size": [h, w], "counts": ...}``) of one image.

    Decoded in chunks (pycocotools) so a many-segment image never holds all masks as pixels.
    """
    from shards import rle as rle_utils

    if len(rles) == 0:
        return torch.zeros(0, grid * grid)
    parts = []
    for start in range(0, len(rles), _CHUNK):
        masks = rle_utils.decode(list(rles[start:start + _CHUNK]))
        parts.append(area_weights(torch.from_numpy(np.ascontiguousarray(masks)), grid, on_empty))
    return torch.cat(parts)
