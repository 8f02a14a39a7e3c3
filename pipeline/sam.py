"""SAM helpers shared by the segmenter stage and automatic mask generation (``evaluation.proposals``).

Two halves, in the style of segment-anything's ``utils/amg.py``:

* Pure mask helpers. The point grids, crop boxes, uncrop helpers, crop-edge test and batched
  mask-to-box are segment-anything's own (``segment_anything.utils.amg``, re-exported here), so
  automatic mask generation lays its prompts and crops exactly as the reference does.
  :func:`stability_score` and :func:`remove_small_regions` are written here: segment-anything's
  clean-up needs OpenCV and works on one mask at a time with a Python list of small regions; this
  one labels each mask's 8-connected components with ``scipy.ndimage.label`` (C, one pass, int32
  labels) and selects regions through a lookup table, with the same semantics and the same
  "changed" flag the automatic mask generator's re-NMS needs.
* The SAM forward shared by both users: :func:`embed_images` (the processor's resize to the long
  side + pad, then the image encoder, once per image) and :func:`decode_prompts` (box or point
  prompts in original-image pixels against one image embedding, logits upscaled to the original
  size through ``post_process_masks``, which removes the padding before upscaling). The prompt
  encoder runs in whatever dtype it holds (float32 when loaded by :func:`pipeline.models.load_sam`,
  so box corners are not rounded to bfloat16) and its outputs are cast to the mask decoder's dtype.

Upscaled logits cost ``prompts x masks per prompt x H x W`` floats (1.5 GB for 32 boxes on a
12 MP photo), so callers decode in slices from :func:`prompt_chunks`, bounded by a pixel budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    build_point_grid,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from transformers import SamModel

__all__ = [
    "MASK_PIXEL_BUDGET", "SamModelFp32Prompts", "batched_mask_to_box", "build_all_layer_point_grids", "build_point_grid",
    "decode_prompts", "embed_images", "generate_crop_boxes", "is_box_near_crop_edge", "prompt_chunks",
    "remove_small_regions", "stability_score", "uncrop_boxes_xyxy", "uncrop_masks", "uncrop_points", "upscale_logits",
]

#: Default bound on upscaled mask pixels decoded at once: 2**26 float32 logits = 256 MiB
#: (218 masks at 640x480, 5 at 12 MP).
MASK_PIXEL_BUDGET = 1 << 26
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as segment-anything's cv2 call


class SamModelFp32Prompts(SamModel):
    """``SamModel`` whose prompt encoder and positional embedding load and stay float32 in any dtype.

    In bfloat16 a box corner at x = 1000 of the 1024 input frame is rounded to a multiple of 4, and
    the random Fourier matrix that encodes it to 3 significant digits, before the sin/cos: box
    edges on large images move by several pixels. Both modules are tiny, so they are kept in float32
    from the weights file on (transformers' ``_keep_in_fp32_modules_strict``; casting a bfloat16 copy
    back up would not restore the rounded matrix), and :func:`decode_prompts` casts their outputs to
    the mask decoder's dtype.
    """

    _keep_in_fp32_modules_strict = ["prompt_encoder", "shared_image_embedding"]


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """SAM's stability: IoU of the masks binarised at ``threshold + offset`` and ``threshold - offset``.

    The inner mask is inside the outer one, so the IoU is a ratio of areas. Rows are summed in int16
    as in segment-anything (2-5x faster than one int64 sum over both axes; int32 for rows too wide
    for int16), then the rows in int64; an empty outer mask scores 0 (segment-anything: NaN, which
    fails every threshold the same way).
    """
    row = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    inner = (logits > threshold + offset).sum(-1, dtype=row).sum(-1, dtype=torch.int64)
    outer = (logits > threshold - offset).sum(-1, dtype=row).sum(-1, dtype=torch.int64)
    return torch.where(outer > 0, inner.double() / outer.clamp(min=1).double(), 0.0).float()


def remove_small_regions(masks: np.ndarray | torch.Tensor, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """SAM's clean-up of a batch ``(n, H, W)``: fill holes, then drop islands, under ``min_area`` pixels.

    Returns the cleaned masks (bool numpy) and, per mask, whether anything changed. As in
    segment-anything: holes are the 8-connected components of the background under ``min_area``
    (touching the border or not) and are filled first; then islands under ``min_area`` are dropped,
    except that a mask made only of small islands keeps its largest (the first in raster order on a
    tie). ``scipy.ndimage.label`` labels one mask per call; the loop runs over masks, not pixels.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.array(masks, dtype=bool, copy=True)
    changed = np.zeros(len(masks), dtype=bool)
    if min_area <= 0:
        return masks, changed
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(~mask, structure=_EIGHT)
        small = np.bincount(labels.ravel(), minlength=n + 1) < min_area
        small[0] = False  # label 0: the mask itself
        if small.any():
            mask |= small[labels]
            changed[i] = True
        labels, n = ndimage.label(mask, structure=_EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_area
        keep[0] = False  # label 0: the background
        if n > 0 and not keep[1:].all():
            if not keep.any():
                keep[1 + int(np.argmax(sizes[1:]))] = True
            mask &= keep[labels]
            changed[i] = True
    return masks, changed


def prompt_chunks(n_prompts: int, pixels_per_prompt: int, pixel_budget: int = MASK_PIXEL_BUDGET,
                  max_per_chunk: int | None = None) -> Iterator[slice]:
    """Slices of ``range(n_prompts)`` whose upscaled masks hold at most ``pixel_budget`` pixels.

    ``pixels_per_prompt`` is masks per prompt x H x W; at least one prompt per slice whatever the
    budget, and at most ``max_per_chunk`` (the configured prompts per decoder forward).
    """
    size = max(1, pixel_budget // max(1, pixels_per_prompt))
    if max_per_chunk is not None:
        size = max(1, min(size, max_per_chunk))
    for start in range(0, n_prompts, size):
        yield slice(start, min(start + size, n_prompts))


def _encoder_dtype(model: Any) -> torch.dtype:
    return model.vision_encoder.patch_embed.projection.weight.dtype


@torch.inference_mode()
def embed_images(model: Any, processor: Any, images: Sequence[Any]
                 ) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Image embeddings ``(B, C, h, w)`` of ``images`` (PIL or ``[H, W, 3]`` uint8), and per image its
    original ``(H, W)`` and the ``(h, w)`` it was resized to inside the padded model input."""
    inputs = processor(images=list(images), return_tensors="pt")
    weight = model.vision_encoder.patch_embed.projection.weight
    pixels = inputs["pixel_values"].to(weight.device, _encoder_dtype(model))
    embeddings = model.get_image_embeddings(pixels)
    originals = [(int(h), int(w)) for h, w in inputs["original_sizes"].tolist()]
    reshaped = [(int(h), int(w)) for h, w in inputs["reshaped_input_sizes"].tolist()]
    return embeddings, originals, reshaped


def _to_input_frame(coords: Any, original_size: tuple[int, int], reshaped_size: tuple[int, int],
                    device: torch.device) -> torch.Tensor:
    """Original-image pixel coordinates (x, y pairs in the last dimension) to the model's input frame
    (segment-anything's ``ResizeLongestSide.apply_coords``), in float32."""
    coords = torch.as_tensor(np.asarray(coords, dtype=np.float32), device=device)
    (oh, ow), (rh, rw) = original_size, reshaped_size
    shape = coords.shape
    scaled = coords.reshape(*shape[:-1], -1, 2) * torch.tensor([rw / ow, rh / oh], device=device)
    return scaled.reshape(shape)


@torch.inference_mode()
def decode_prompts(model: Any, processor: Any, embedding: torch.Tensor, original_size: tuple[int, int],
                   reshaped_size: tuple[int, int], *, boxes: Any = None, points: Any = None,
                   point_labels: Any = None, multimask: bool = False, upscale: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits ``(n, k, H, W)`` float32 at the original size and predicted IoUs ``(n, k)``.

    ``embedding`` is one image's ``(C, h, w)`` (or ``(1, C, h, w)``) from :func:`embed_images`.
    Prompts are in original-image pixels: ``boxes`` ``(n, 4)`` xyxy, ``points`` ``(n, m, 2)`` xy with
    ``point_labels`` ``(n, m)`` (1 foreground, 0 background; default all 1), each of the ``n``
    prompts its own mask(s). ``k`` is 3 with ``multimask`` (SAM's three granularities), else 1.
    ``upscale=False`` returns the decoder's low-resolution logits instead (``(n, k, 256, 256)``), for a
    caller that drops masks by predicted IoU before paying for :func:`upscale_logits`.
    """
    if boxes is None and points is None:
        raise ValueError("decode_prompts needs boxes or points")
    embedding = embedding if embedding.dim() == 4 else embedding[None]
    device = embedding.device
    dtype = model.mask_decoder.iou_token.weight.dtype
    input_boxes = input_points = input_labels = None
    if boxes is not None:
        input_boxes = _to_input_frame(boxes, original_size, reshaped_size, device).reshape(1, -1, 4)
    if points is not None:
        input_points = _to_input_frame(points, original_size, reshaped_size, device)
        if input_points.dim() == 2:  # (n, 2): one point per prompt
            input_points = input_points[:, None]
        input_points = input_points[None]
        if point_labels is None:
            input_labels = torch.ones(input_points.shape[:-1], dtype=torch.int64, device=device)
        else:
            input_labels = torch.as_tensor(np.asarray(point_labels), device=device).reshape(input_points.shape[:-1])
    sparse, dense = model.prompt_encoder(input_points=input_points, input_labels=input_labels,
                                         input_boxes=input_boxes, input_masks=None)
    image_pe = model.get_image_wide_positional_embeddings()
    low, iou = model.mask_decoder(image_embeddings=embedding, image_positional_embeddings=image_pe.to(dtype),
                                  sparse_prompt_embeddings=sparse.to(dtype), dense_prompt_embeddings=dense.to(dtype),
                                  multimask_output=multimask)
    low = low[0].float()
    return (upscale_logits(processor, low, original_size, reshaped_size) if upscale else low), iou[0].float()


def upscale_logits(processor: Any, low: torch.Tensor, original_size: tuple[int, int],
                   reshaped_size: tuple[int, int]) -> torch.Tensor:
    """Low-resolution mask logits ``(n, k, 256, 256)`` -> ``(n, k, H, W)`` float32 at the original size
    (the processor's ``post_process_masks``: to the padded input size, crop the padding, to the image
    size). Each mask is resized on its own, so resizing a subset gives the same values."""
    return processor.post_process_masks([low.float()], [original_size], [reshaped_size], binarize=False)[0]
