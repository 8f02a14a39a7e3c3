"""Masks from box prompts with SAM (``SamModel``), straight to COCO RLE.

Per image: the processor resizes it to the 1024-long side (padded square) and rescales its box
prompts (original-image pixels, ``record.boxes``) the same way; the image embedding is computed
once (``get_image_embeddings``, ``image_batch_size`` images per forward); the mask decoder then
runs on all boxes of the image, ``boxes_per_batch`` at a time. For a box SAM's authors recommend one
mask (``multimask_output=False``); with ``multimask=True`` the best of three by predicted IoU is
kept. Low-resolution logits go back to the original size through ``processor.post_process_masks``
with the original and reshaped sizes (which removes the padding before upscaling).

Quality filters as in SAM's automatic mask generator, on the upscaled logits: predicted IoU at
least ``pred_iou_thresh``; stability score (area at threshold +offset over area at -offset) at
least ``stability_score_thresh``. Then SAM's ``remove_small_regions`` (holes first, then islands,
8-connectivity, keeping the largest island when all are small), vectorised over the boxes of a batch
in torch (label propagation with pointer jumping; no OpenCV or SciPy). Each surviving mask becomes a
segment ``{id, rle, bbox, area, texts, score}``: the box's phrase with its source and grounding score
as the text, SAM's predicted IoU as the score. Empty masks are dropped; annotation segments already in
``record.segments`` are kept and new ids continue after theirs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.record import Record, records_of, with_records
from shards import rle as rle_utils

from .common import chunks, decode_pending, load_model
from .config import SegmenterConfig

log = logging.getLogger(__name__)
STAGE = "segmenter"


class Segmenter:
    """Ray Data callable: turns ``record.boxes`` into RLE segments in ``record.segments``."""

    def __init__(self, config: SegmenterConfig | dict):
        from transformers import SamModel, SamProcessor

        self.config = config if isinstance(config, SegmenterConfig) else SegmenterConfig.model_validate(config)
        self.processor, self.model, self.device, self.dtype = load_model(STAGE, self.config, SamProcessor, SamModel)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        todo = list(decode_pending(batch, records, STAGE, want=lambda r: bool(r.boxes),
                                   max_pixels=self.config.max_pixels))
        for group in chunks(todo, self.config.image_batch_size):
            self._segment_group(group, records)
        for r in records:
            if r.failure is None and not r.segments:
                r.fail(STAGE, "no non-empty mask passed the filters" if r.boxes else "no box to segment")
        return with_records(batch, records)

    def _segment_group(self, group, records: list[Record]) -> None:
        """Segment a group of images; when it fails, retry them one by one so only the culprit fails."""
        before = [len(records[i].segments) for i, _ in group]
        try:
            self.segment_images([records[i] for i, _ in group], [image for _, image in group])
        except Exception as e:  # a failing forward fails its images, not the job
            for (i, _), n in zip(group, before, strict=True):
                del records[i].segments[n:]
            if len(group) > 1:
                for item in group:
                    self._segment_group([item], records)
                return
            log.warning("%s: segmentation failed for %s: %s", STAGE, records[group[0][0]].image_id, e)
            records[group[0][0]].fail(STAGE, e)

    @torch.inference_mode()
    def segment_images(self, records: list[Record], images: list) -> None:
        inputs = [self.processor(images=[im], input_boxes=[[b.xyxy for b in r.boxes]], return_tensors="pt")
                  for r, im in zip(records, images, strict=True)]
        pixels = torch.cat([x["pixel_values"] for x in inputs]).to(self.device, self.dtype)
        embeddings = self.model.get_image_embeddings(pixels)
        for k, (record, x) in enumerate(zip(records, inputs, strict=True)):
            boxes = x["input_boxes"][0]  # (n_boxes, 4) in the model's input frame
            original, reshaped = x["original_sizes"][:1], x["reshaped_input_sizes"][:1]
            next_id = max((int(s.get("id", -1)) for s in record.segments), default=-1) + 1
            for start in range(0, len(boxes), self.config.boxes_per_batch):
                sel = slice(start, start + self.config.boxes_per_batch)
                masks, scores, keep = self.decode_boxes(embeddings[k:k + 1], boxes[sel], original, reshaped)
                kept = np.flatnonzero(keep)
                rles = rle_utils.encode(masks[kept])
                for j, rle, area, bbox in zip(kept, rles, rle_utils.area(rles), rle_utils.bbox(rles), strict=True):
                    if area == 0:
                        continue
                    box = record.boxes[start + j]
                    record.segments.append({
                        "id": next_id, "rle": rle, "bbox": [float(v) for v in bbox], "area": int(area),
                        "texts": [{"text": box.text, "source": box.source, "score": float(box.score)}],
                        "score": float(scores[j])})
                    next_id += 1

    @torch.inference_mode()
    def decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor, original, reshaped
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks ``(n, H, W)`` bool at the original size, predicted IoUs ``(n,)``, which pass the filters ``(n,)``."""
        cfg = self.config
        out = self.model(image_embeddings=embedding, input_boxes=boxes[None].to(self.device, self.dtype),
                         multimask_output=cfg.multimask)
        iou = out.iou_scores[0].float()  # (n, k)
        low = out.pred_masks[0].float()  # (n, k, h, w)
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        iou, low = iou[rows, best], low[rows, best]
        logits = self.processor.post_process_masks([low[:, None]], original, reshaped, binarize=False)[0][:, 0]
        masks = logits > cfg.mask_threshold
        keep = torch.ones_like(iou, dtype=torch.bool)
        if cfg.pred_iou_thresh > 0:  # 0 switches a filter off (predicted IoUs can be negative)
            keep &= iou >= cfg.pred_iou_thresh
        if cfg.stability_score_thresh > 0:
            stability = stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset)
            keep &= stability >= cfg.stability_score_thresh
        if cfg.min_region_area > 0 and keep.any():
            masks[keep] = remove_small_regions(masks[keep], cfg.min_region_area)
        return masks.cpu().numpy(), iou.cpu().numpy(), keep.cpu().numpy()


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """SAM's stability: IoU of the masks binarised at ``threshold + offset`` and ``threshold - offset``."""
    inner = (logits > threshold + offset).sum(dim=(-1, -2), dtype=torch.int64)
    outer = (logits > threshold - offset).sum(dim=(-1, -2), dtype=torch.int64)
    return torch.where(outer > 0, inner.float() / outer.clamp(min=1).float(), torch.zeros_like(inner, dtype=torch.float))


def remove_small_regions(masks: torch.Tensor, min_area: int) -> torch.Tensor:
    """SAM's clean-up for a batch ``(n, H, W)``: fill holes, then drop islands, under ``min_area`` pixels.

    Like SAM, an island is kept when it is the largest of its mask (so a mask made only of small
    islands keeps its largest one) and every background region under ``min_area`` is a hole, whether
    it touches the border or not.
    """
    if masks.numel() == 0:
        return masks
    holes = component_sizes(~masks)
    masks = masks | ((holes > 0) & (holes < min_area))
    islands = component_sizes(masks)
    largest = islands.flatten(1).max(dim=1).values[:, None, None]
    return masks & ((islands >= min_area) | (islands == largest))


def component_sizes(masks: torch.Tensor) -> torch.Tensor:
    """For each ``True`` pixel, the size of its 8-connected component in its own mask; 0 elsewhere."""
    n, h, w = masks.shape
    hw = h * w
    big = hw  # larger than any pixel index: the label of background pixels
    index = torch.arange(hw, device=masks.device).view(1, h, w).expand(n, h, w)
    labels = torch.where(masks, index, torch.full_like(index, big))
    offsets = (torch.arange(n, device=masks.device) * hw)[:, None]
    while True:
        padded = F.pad(labels, (1, 1, 1, 1), value=big)
        neighbours = padded[:, 1:1 + h, 1:1 + w].clone()  # a running minimum: never 9 copies of the labels
        for dy in range(3):
            for dx in range(3):
                if (dy, dx) != (1, 1):
                    torch.minimum(neighbours, padded[:, dy:dy + h, dx:dx + w], out=neighbours)
        new = torch.where(masks, neighbours, labels)
        flat = new.view(n, hw)
        # pointer jumping: a label is the index of a pixel of the same component, whose label is smaller
        for _ in range(2):
            fg = flat < big
            flat = torch.where(fg, torch.gather(flat, 1, flat.clamp(max=hw - 1)), flat)
        new = flat.view(n, h, w)
        if torch.equal(new, labels):
            break
        labels = new
    flat = labels.reshape(n, hw)
    fg = flat < big
    global_labels = (flat + offsets)[fg]
    counts = torch.bincount(global_labels, minlength=n * hw)
    sizes = torch.zeros_like(flat)
    sizes[fg] = counts[global_labels]
    return sizes.view(n, h, w)
