"""Class-agnostic mask proposals: segment-anything's ``SamAutomaticMaskGenerator`` on transformers' SAM.

The algorithm and its defaults are segment-anything's (``AMGConfig`` documents each), run on
``SamModel`` through :mod:`pipeline.sam`, the same loading and forward as the curation segmenter:

1. Crops: the whole image, plus ``crop_n_layers`` layers of ``(2**i)**2`` overlapping crops
   (``generate_crop_boxes``). Each crop is embedded once; crops are embedded ``crop_batch_size`` at a
   time (transformers' ``mask-generation`` pipeline embeds them one by one).
2. Per crop: a grid of ``points_per_side**2`` point prompts (fewer in deeper layers), decoded
   ``points_per_batch`` at a time against the crop's one embedding, three masks per point. Masks
   are kept when predicted IoU > ``pred_iou_thresh`` and stability >= ``stability_score_thresh``,
   binarised, dropped when their box touches a crop edge that is not an image edge, and put back
   into the image frame. Box NMS (``torchvision.ops.batched_nms``, predicted IoU as the score,
   ``box_nms_thresh``) within each crop.
3. Across crops (only when there are several): box NMS preferring masks from smaller crops
   (score = 1 / crop area, ``crop_nms_thresh``).
4. With ``min_mask_region_area`` > 0: holes and islands under that area are removed
   (:func:`pipeline.sam.remove_small_regions`), and NMS runs again preferring unchanged masks.

Where this differs from transformers' ``mask-generation`` pipeline: one NMS per crop and one across
crops (it runs one NMS over everything), the small-region clean-up (it has none), and crops
embedded in batches. Where it differs from segment-anything itself: the image is resized by
transformers' ``SamImageProcessor`` (bilinear on a tensor, vs PIL bilinear on uint8), which moves
some pixel values by one grey level, masks are decoded in slices bounded by
``mask_pixel_budget``, and only masks that pass the predicted-IoU filter are upscaled;
``tests/test_sam_reference.py`` shows the proposals still equal the reference.

Masks leave as COCO RLE (``shards.rle``); each proposal is the reference's record:
``{"rle", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"}``, with
``bbox`` and ``crop_box`` as ``[x, y, w, h]`` exactly as segment-anything gives them (``bbox`` from
the mask's first and last pixel: ``w = x_last - x_first``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

from pipeline.models import load_sam, resolve
from pipeline.sam import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    decode_prompts,
    embed_images,
    generate_crop_boxes,
    is_box_near_crop_edge,
    prompt_chunks,
    remove_small_regions,
    stability_score,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
    upscale_logits,
)
from shards import rle as rle_utils

from .config import AMGConfig

#: Settings that change no output (how work is batched, where weights live); left out of the fingerprint.
_NOT_FINGERPRINTED = ("model", "models_dir", "device", "points_per_batch", "crop_batch_size", "mask_pixel_budget")
_HASH_BYTES = 1 << 20  # bytes hashed at each end of a weights file


class MaskGenerator:
    """Segment-anything's automatic mask generation on a transformers ``SamModel`` (see the module docstring)."""

    def __init__(self, config: AMGConfig, processor: Any, model: Any, weights_id: str):
        self.config = config
        self.processor = processor
        self.model = model
        self.weights_id = weights_id
        self.point_grids = build_all_layer_point_grids(config.points_per_side, config.crop_n_layers,
                                                       config.crop_n_points_downscale_factor)

    @classmethod
    def load(cls, config: AMGConfig) -> MaskGenerator:
        """Load SAM as the curation segmenter does (:func:`pipeline.models.load_sam`)."""
        processor, model, _, dtype = load_sam(config.model, models_dir=config.models_dir, device=config.device,
                                              dtype=config.dtype)
        weights_id = f"{weights_identity(resolve(config.model, config.models_dir))}:{str(dtype).removeprefix('torch.')}"
        return cls(config, processor, model, weights_id)

    def fingerprint(self) -> str:
        """Hash of the SAM weights (content, not path) and of every setting that changes the proposals."""
        settings = self.config.model_dump(exclude=set(_NOT_FINGERPRINTED))
        payload = json.dumps({"weights": self.weights_id, "settings": settings}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> list[dict]:
        """Proposals for one ``[H, W, 3]`` uint8 RGB image, best predicted IoU first within each crop."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"generate expects an [H, W, 3] uint8 RGB array, got {image.dtype} {image.shape}")
        cfg = self.config
        h, w = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((h, w), cfg.crop_n_layers, cfg.crop_overlap_ratio)
        found: list[dict[str, Any]] = []
        for start in range(0, len(crop_boxes), cfg.crop_batch_size):
            boxes = crop_boxes[start:start + cfg.crop_batch_size]
            crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
            embeddings, originals, reshaped = embed_images(self.model, self.processor, crops)
            for k, (box, layer) in enumerate(zip(boxes, layers[start:start + cfg.crop_batch_size], strict=True)):
                found.append(self._crop(embeddings[k], originals[k], reshaped[k], box, layer, (h, w)))
        data = _cat(found, ("rles", "boxes", "iou", "stability", "points", "crop_boxes"))
        if len(crop_boxes) > 1 and len(data["iou"]):
            keep = batched_nms(data["boxes"].float(), 1 / box_area(data["crop_boxes"].float()),
                               torch.zeros(len(data["boxes"])), iou_threshold=cfg.crop_nms_thresh)
            data = _select(data, keep)
        if cfg.min_mask_region_area > 0 and len(data["iou"]):
            data = self._clean(data, (h, w))
        return [{"rle": data["rles"][i], "bbox": _xywh(data["boxes"][i]), "area": int(area),
                 "predicted_iou": float(data["iou"][i]), "stability_score": float(data["stability"][i]),
                 "point_coords": [[float(v) for v in data["points"][i]]], "crop_box": _xywh(data["crop_boxes"][i])}
                for i, area in enumerate(rle_utils.area(data["rles"]))]

    def _crop(self, embedding: torch.Tensor, size: tuple[int, int], reshaped: tuple[int, int],
              crop_box: list[int], layer: int, image_size: tuple[int, int]) -> dict[str, Any]:
        """One crop's masks after the quality filters, the crop-edge test and the crop's own NMS."""
        cfg = self.config
        ch, cw = size
        h, w = image_size
        points = self.point_grids[layer] * np.array([[cw, ch]])
        parts = []
        for sel in prompt_chunks(len(points), 3 * ch * cw, cfg.mask_pixel_budget, cfg.points_per_batch):
            low, iou = decode_prompts(self.model, self.processor, embedding, size, reshaped,
                                      points=points[sel][:, None], multimask=True, upscale=False)
            low, iou = low.flatten(0, 1), iou.flatten(0, 1)
            pts = torch.as_tensor(points[sel]).repeat_interleave(3, dim=0)
            # The predicted-IoU filter does not look at the mask, so only the masks it keeps are upscaled
            # (segment-anything upscales every mask first: same result, more work).
            idx = torch.arange(len(iou), device=iou.device)
            if cfg.pred_iou_thresh > 0:
                idx = idx[iou > cfg.pred_iou_thresh]
            logits = upscale_logits(self.processor, low[idx][:, None], size, reshaped)[:, 0]
            del low
            stability = stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset)
            if cfg.stability_score_thresh > 0:
                stable = stability >= cfg.stability_score_thresh
                logits, stability, idx = logits[stable], stability[stable], idx[stable.to(idx.device)]
            masks = logits > cfg.mask_threshold
            del logits
            boxes = batched_mask_to_box(masks)
            inner = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, w, h])
            masks, boxes, stability = masks[inner], boxes[inner], stability[inner]
            idx = idx[inner.to(idx.device)]
            parts.append({"rles": rle_utils.encode(uncrop_masks(masks, crop_box, h, w).cpu().numpy()),
                          "boxes": boxes.cpu(), "iou": iou[idx].cpu(), "stability": stability.cpu(),
                          "points": pts[idx.cpu()]})
        data = _cat(parts)
        if len(data["iou"]):
            keep = batched_nms(data["boxes"].float(), data["iou"], torch.zeros(len(data["boxes"])),
                               iou_threshold=cfg.box_nms_thresh)
            data = _select(data, keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["iou"]), dtype=torch.int64).reshape(-1, 4)
        return data

    def _clean(self, data: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
        """Segment-anything's ``postprocess_small_regions``: clean-up, then NMS preferring unchanged masks.

        Masks are decoded from their RLEs a slice at a time (the pixel budget), not all at once.
        """
        cfg = self.config
        h, w = size
        rles, boxes = list(data["rles"]), data["boxes"].clone()
        unchanged = torch.zeros(len(rles))
        for sel in prompt_chunks(len(rles), h * w, cfg.mask_pixel_budget):
            masks, changed = remove_small_regions(rle_utils.decode(rles[sel]), cfg.min_mask_region_area)
            cleaned = torch.from_numpy(masks)
            new_boxes = batched_mask_to_box(cleaned)
            for j in np.flatnonzero(changed):
                rles[sel.start + j] = rle_utils.encode_one(masks[j])
                boxes[sel.start + j] = new_boxes[j]
            unchanged[sel] = torch.from_numpy(~changed).float()
        keep = batched_nms(boxes.float(), unchanged, torch.zeros(len(boxes)),
                           iou_threshold=max(cfg.box_nms_thresh, cfg.crop_nms_thresh))
        return _select({**data, "rles": rles, "boxes": boxes}, keep)


def weights_identity(model_dir: str | Path) -> str:
    """A content hash of a model directory: its configs, and each weight file's size and first and last MiB.

    Hashing whole multi-GB files would cost seconds per actor start; two different checkpoints of one
    architecture differ in their first and last tensors, and the same weights in another directory
    (or downloaded again) hash the same.
    """
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        if path.suffix == ".json":
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pth", ".pt"):
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(_HASH_BYTES)
                f.seek(max(0, size - _HASH_BYTES))
                tail = f.read(_HASH_BYTES)
            digest.update(f"{path.name}\0{size}\0".encode() + head + tail)
    return digest.hexdigest()[:24]


_EMPTY = {"boxes": (0, 4), "iou": (0,), "stability": (0,), "points": (0, 2), "crop_boxes": (0, 4)}


def _cat(parts: list[dict[str, Any]], keys: tuple[str, ...] = ("rles", "boxes", "iou", "stability", "points")
         ) -> dict[str, Any]:
    """Concatenate per-batch (or per-crop) results; ``rles`` are lists, the rest tensors."""
    out: dict[str, Any] = {"rles": [r for p in parts for r in p["rles"]]} if "rles" in keys else {}
    for key in keys:
        if key != "rles":
            values = [p[key] for p in parts]
            out[key] = torch.cat(values) if values else torch.zeros(_EMPTY[key])
    return out


def _select(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    idx = keep.cpu()
    return {k: [v[i] for i in idx.tolist()] if isinstance(v, list) else v[idx] for k, v in data.items()}


def _xywh(box: torch.Tensor) -> list[int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]
