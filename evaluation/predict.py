"""One image end to end: masks -> USE embeddings -> class probabilities -> per-pixel vote -> confusion.

Masks come either from the ground truth (oracle: one mask per class present, so classification is
measured apart from mask quality) or from SAM's automatic mask generation on the image resized for
inference (proposals cached per image). The whole image is embedded as one more mask, for the
``image`` rule of pixels no mask covers (``evaluation.aggregate``).

Resolution: the oracle path embeds and votes at the ground truth's resolution (its masks *are* the
ground truth). The SAM path runs SAM, the embeddings and the vote at the inference size
(``resize``), and the label map is resized back to the ground truth's size (nearest) to be scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shards import rle as rle_utils
from trainer.model import USEModel

from .aggregate import aggregate
from .classify import TextClassifier
from .config import EvalConfig
from .datasets import IGNORE, Sample, SemSegDataset
from .images import inference_size, read_rgb, resize_labels
from .metrics import ConfusionMatrix
from .proposal_cache import ProposalCache
from .proposals import MaskGenerator


@dataclass
class ImageResult:
    """What one image contributes: the non-zero cells ``[row, col, count]`` of its confusion matrix."""

    key: str
    cells: list[list[int]] = field(default_factory=list)
    masks: int = 0
    seconds: float = 0.0
    error: str = ""
    node: str = ""        # the Ray node that evaluated it ("" in-process)
    prediction: np.ndarray | None = None  # class ids at ground-truth size (not serialised)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "cells": self.cells, "masks": self.masks, "seconds": round(self.seconds, 4),
                "error": self.error, "node": self.node}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageResult:
        return cls(d["key"], d["cells"], d["masks"], d["seconds"], d["error"], d.get("node", ""))

    def add_to(self, cm: ConfusionMatrix) -> None:
        if self.cells:
            rows, cols, counts = np.asarray(self.cells, dtype=np.int64).T
            np.add.at(cm.matrix, (rows, cols), counts)


def oracle_masks(labels: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` one mask per class present in the ground truth (ignore pixels in none)."""
    classes = np.unique(labels[labels != IGNORE])
    return labels[None] == classes[:, None, None]


class Predictor:
    """Holds the model, the class texts and (SAM path) the mask generator; call :meth:`evaluate` per image."""

    def __init__(self, cfg: EvalConfig, dataset: SemSegDataset, model: Any, oracle: bool,
                 generator: MaskGenerator | None = None, cache: ProposalCache | None = None):
        if not oracle and generator is None:
            raise ValueError("the SAM path needs a mask generator")
        self.cfg = cfg
        self.dataset = dataset
        self.model = model
        self.oracle = oracle
        self.generator = generator
        self.cache = cache
        p = cfg.prompts
        self.classifier = TextClassifier(model, dataset.classes.vocabulary(p.vocabulary), p.templates, p.combine,
                                         p.text_batch_size)

    def masks_for(self, image: Image.Image, key: str) -> np.ndarray:
        """SAM proposals of ``image`` as ``[S, H, W]`` bool, from the cache when present."""
        proposals = self.cache.get(key) if self.cache is not None else None
        if proposals is None:
            proposals = self.generator.generate(np.array(image))  # writable: torch.from_numpy warns otherwise
            if self.cache is not None:
                self.cache.put(key, proposals)
        h, w = image.height, image.width
        if not proposals:
            return np.zeros((0, h, w), bool)
        masks = rle_utils.decode([p["rle"] for p in proposals])
        if masks.shape[1:] != (h, w):
            raise ValueError(f"cached proposals are {masks.shape[2]}x{masks.shape[1]}, the image {w}x{h}")
        return masks

    def predict(self, image: Image.Image, labels: np.ndarray, key: str) -> tuple[np.ndarray, int]:
        """Class ids ``[H, W]`` at the ground truth's size, and the number of masks used."""
        gh, gw = labels.shape
        if (image.height, image.width) != (gh, gw):
            raise ValueError(f"image is {image.width}x{image.height} but its label is {gw}x{gh}")
        if self.oracle:
            work, masks = image, oracle_masks(labels)
        else:
            r = self.cfg.resize
            size = inference_size(image.width, image.height, r.short_side, r.max_long_side)
            work = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
            masks = self.masks_for(work, key)
        whole = np.ones((1, work.height, work.width), bool)
        emb = self.model.embed_masks(work, np.concatenate([masks, whole]))
        probs = self.classifier.probabilities(emb).cpu().numpy()
        pred = aggregate(masks, probs[:-1], self.cfg.aggregate.uncovered, image_probs=probs[-1])
        return resize_labels(pred, gh, gw), len(masks)

    def evaluate(self, sample: Sample, keep_prediction: bool = False) -> ImageResult:
        """Predict and score one image; a bad image becomes a result with ``error`` set."""
        start = time.perf_counter()
        try:
            labels = self.dataset.load_label(sample)
            image = read_rgb(sample.image)
            with torch.inference_mode():
                pred, n = self.predict(image, labels, sample.key)
        except (OSError, ValueError) as e:
            return ImageResult(sample.key, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
        cm = ConfusionMatrix(self.dataset.num_classes)
        cm.update(pred, labels, ignore_mask=labels == IGNORE)
        rows, cols = np.nonzero(cm.matrix)
        cells = [[int(r), int(c), int(cm.matrix[r, c])] for r, c in zip(rows, cols, strict=True)]
        return ImageResult(sample.key, cells, n, time.perf_counter() - start,
                           prediction=pred if keep_prediction else None)


def load_predictor(cfg: EvalConfig, dataset: SemSegDataset, checkpoint: str, oracle: bool,
                   cache_root: str | Path | None) -> Predictor:
    """Load the USE model (and SAM, unless oracle) once; used by each Ray actor and by local runs."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = USEModel.from_pretrained(checkpoint, map_location=device).eval()
    generator = cache = None
    if not oracle:
        generator = MaskGenerator.load(cfg.sam)
        cache = ProposalCache(cache_root, proposal_fingerprint(generator, cfg)) if cache_root else None
    return Predictor(cfg, dataset, model, oracle, generator, cache)


def proposal_fingerprint(generator: MaskGenerator, cfg: EvalConfig) -> str:
    """SAM's fingerprint plus the inference size rule (the proposals' image frame)."""
    return f"{generator.fingerprint()}-s{cfg.resize.short_side}-m{cfg.resize.max_long_side}"
