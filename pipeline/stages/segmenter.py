"""Masks from box prompts with SAM (``SamModel``), straight to COCO RLE.

The SAM forward is :mod:`pipeline.sam`'s, shared with automatic mask generation: images are
embedded ``image_batch_size`` at a time (resized to the model's long side, padded square); the box
prompts (original-image pixels, ``record.boxes``) are scaled into that frame and decoded against
their image's embedding, with the prompt encoder in float32 (:func:`pipeline.models.load_sam`). For a
box SAM's authors recommend one mask (``multimask_output=False``); with ``multimask=True`` the best
of three by predicted IoU is kept. Logits are upscaled to the original size with the padding removed
first. Boxes are decoded ``boxes_per_batch`` at a time and fewer on large images, so that one slice's
upscaled logits stay under ``mask_pixel_budget`` pixels (32 boxes on a 12 MP photo would be 1.5 GB
of float32 logits).

Quality filters as in SAM's automatic mask generator, on the upscaled logits: predicted IoU at
least ``pred_iou_thresh``; stability score (area at threshold +offset over area at -offset) at
least ``stability_score_thresh``. Then SAM's ``remove_small_regions`` (holes first, then islands,
8-connectivity, keeping the largest island when all are small; scipy connected components). Each
surviving mask becomes a ``shards.schema.Segment`` ``(id, rle, bbox, area, texts, score)``: the box's phrase with its
source and grounding score as the text, SAM's predicted IoU as the score. Empty masks are dropped; annotation segments already in
``record.segments`` are kept and new ids continue after theirs.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models import ModelNotFoundError, load_sam
from pipeline.record import Record, records_of, with_records
from pipeline.retry import retry_per_item
from pipeline.sam import decode_prompts, embed_images, prompt_chunks, remove_small_regions, stability_score
from shards import rle as rle_utils
from shards.schema import Segment, Text

from .common import chunks, decode_pending, load_error
from .config import SegmenterConfig

STAGE = "segmenter"


class Segmenter:
    """Ray Data callable: turns ``record.boxes`` into RLE segments in ``record.segments``."""

    def __init__(self, config: SegmenterConfig | dict):
        self.config = config if isinstance(config, SegmenterConfig) else SegmenterConfig.model_validate(config)
        cfg = self.config
        try:
            self.processor, self.model, self.device, self.dtype = load_sam(
                cfg.model, models_dir=cfg.models_dir, device=cfg.device, dtype=cfg.dtype)
        except ModelNotFoundError:
            raise
        except Exception as e:
            raise load_error(STAGE, cfg.model, e) from e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        todo = list(decode_pending(batch, records, STAGE, want=lambda r: bool(r.boxes),
                                   policy=self.config.read))
        for group in chunks(todo, self.config.image_batch_size):
            retry_per_item(group, lambda g: self._segment_group(g, records), lambda item, e: records[item[0]].fail(STAGE, e),
                           what=f"{STAGE}: segmentation", describe=lambda item: records[item[0]].image_id)
        for r in records:
            if r.failure is None and not r.segments:
                r.fail(STAGE, "no non-empty mask passed the filters" if r.boxes else "no box to segment")
        return with_records(batch, records)

    def _segment_group(self, group, records: list[Record]) -> None:
        """Segment a group of (row, image), all or nothing: on failure its new segments are removed
        (and :func:`pipeline.retry.retry_per_item` runs the images one at a time)."""
        before = [len(records[i].segments) for i, _ in group]
        try:
            self.segment_images([records[i] for i, _ in group], [image for _, image in group])
        except Exception:
            for (i, _), n in zip(group, before, strict=True):
                del records[i].segments[n:]
            raise

    @torch.inference_mode()
    def segment_images(self, records: list[Record], images: list) -> None:
        cfg = self.config
        embeddings, originals, reshaped = embed_images(self.model, self.processor, images)
        masks_per_box = 3 if cfg.multimask else 1
        for k, record in enumerate(records):
            boxes = np.array([b.xyxy for b in record.boxes], dtype=np.float32).reshape(-1, 4)
            h, w = originals[k]
            next_id = max((s.id for s in record.segments), default=-1) + 1
            for sel in prompt_chunks(len(boxes), masks_per_box * h * w, cfg.mask_pixel_budget,
                                     cfg.boxes_per_batch):
                masks, scores, keep = self.decode_boxes(embeddings[k], boxes[sel], originals[k], reshaped[k])
                kept = np.flatnonzero(keep)
                rles = rle_utils.encode(masks[kept])
                for j, rle, area, bbox in zip(kept, rles, rle_utils.area(rles), rle_utils.bbox(rles), strict=True):
                    if area == 0:
                        continue
                    box = record.boxes[sel.start + j]
                    record.segments.append(Segment(
                        id=next_id, rle=rle, bbox=[float(v) for v in bbox], area=int(area),
                        texts=[Text(box.text, box.source, float(box.score))], score=float(scores[j])))
                    next_id += 1

    @torch.inference_mode()
    def decode_boxes(self, embedding: torch.Tensor, boxes: np.ndarray, original: tuple[int, int],
                     reshaped: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks ``(n, H, W)`` bool at the original size, predicted IoUs ``(n,)``, which pass the filters ``(n,)``."""
        cfg = self.config
        logits, iou = decode_prompts(self.model, self.processor, embedding, original, reshaped, boxes=boxes,
                                     multimask=cfg.multimask)
        rows = torch.arange(len(iou), device=iou.device)
        best = iou.argmax(dim=1)
        iou, logits = iou[rows, best], logits[rows, best]
        keep = torch.ones_like(iou, dtype=torch.bool)
        if cfg.pred_iou_thresh > 0:  # 0 switches a filter off (predicted IoUs can be negative)
            keep &= iou >= cfg.pred_iou_thresh
        if cfg.stability_score_thresh > 0:
            keep &= stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset) >= cfg.stability_score_thresh
        masks = (logits > cfg.mask_threshold).cpu().numpy()
        keep = keep.cpu().numpy()
        if cfg.min_region_area > 0 and keep.any():
            masks[keep] = remove_small_regions(masks[keep], cfg.min_region_area)[0]
        return masks, iou.cpu().numpy(), keep
