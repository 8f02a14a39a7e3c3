"""One image and its segment masks -> the model's inputs: resized pixels and area weights.

The single implementation of "resize + area weights" shared by the trainer's data path
(:class:`trainer.data.SampleProcessor`, masks as shard RLEs) and by :meth:`USEModel.embed_masks`
(evaluation and search, masks as arrays or RLEs), so a segment is embedded from exactly the inputs
it was trained on. The resize is :class:`~trainer.model.transforms.ImageTransform` (the whole image
to each backbone's square, see there why), the weights :mod:`trainer.model.area_weights` on the
model's grid partition of the original image. A mask that covers no pixel has no area: its row is
all zeros and ``valid`` is False for it (the trainer drops it, ``embed_masks`` returns a zero row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .area_weights import area_weights, area_weights_from_rle, valid_rows

#: Boolean masks ``[S, H, W]`` (numpy or torch) or COCO RLEs ``{"size": [h, w], "counts": ...}``.
Masks = np.ndarray | torch.Tensor | Sequence[Mapping[str, Any]]


@dataclass
class SegmentInputs:
    """``pixels`` {backbone: [3, h, w]} (None when only weights were asked for), ``weights [S, G*G]``
    (non-empty rows sum to 1), ``valid [S]`` (the mask had area)."""

    pixels: dict[str, torch.Tensor] | None
    weights: torch.Tensor
    valid: torch.Tensor


def _mask_size(masks: Masks) -> tuple[int, int] | None:
    """(H, W) shared by all masks, or None when there are none; raises when they disagree."""
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        if masks.ndim != 3:
            raise ValueError(f"masks must be [S, H, W], got shape {tuple(masks.shape)}")
        return (int(masks.shape[1]), int(masks.shape[2])) if masks.shape[0] else None
    sizes = {tuple(int(v) for v in r["size"]) for r in masks}
    if len(sizes) > 1:
        raise ValueError(f"RLEs of one image have different sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def segment_weights(masks: Masks, grid: int, image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Area weights ``[S, grid*grid]`` float32 and ``valid [S]`` for masks of one image.

    ``image_size`` is the image's ``(width, height)`` (PIL's order); masks of another size are an
    error, since their weights would not line up with the image's patches.
    """
    hw = _mask_size(masks)
    if image_size is not None and hw is not None and hw != (image_size[1], image_size[0]):
        raise ValueError(f"masks are {hw[1]}x{hw[0]} (WxH) but the image is {image_size[0]}x{image_size[1]}")
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if isinstance(masks, torch.Tensor):
        weights = area_weights(masks.bool(), grid)
    else:
        weights = area_weights_from_rle(list(masks), grid)
    return weights, valid_rows(weights)


def segment_inputs(image: Image.Image | None, masks: Masks, *, transform: Callable[[Image.Image], dict[str, torch.Tensor]],
                   grid: int) -> SegmentInputs:
    """Resize ``image`` for the backbones (skipped when ``None``: features come from the cache) and
    weigh ``masks`` on the grid."""
    weights, valid = segment_weights(masks, grid, None if image is None else image.size)
    pixels = None if image is None else transform(image)
    return SegmentInputs(pixels=pixels, weights=weights, valid=valid)
