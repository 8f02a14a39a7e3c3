"""Test doubles for the evaluation: a model whose mask embeddings are chosen from the ground truth.

``GroundTruthModel`` implements the two things the evaluation asks of a USE model: ``encode_text``
(a fixed random unit vector per distinct text, so class embeddings are well separated) and
``embed_masks`` (for each mask, the class embedding of the ground-truth class it covers most,
optionally through a permutation of the classes). It needs the class embeddings the predictor
computed from its own ``encode_text``; ``attach`` hands them over.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.datasets import IGNORE, SemSegDataset
from evaluation.images import read_rgb


class GroundTruthModel:
    def __init__(self, dataset: SemSegDataset, dim: int = 64, permutation: np.ndarray | None = None):
        self.dim = dim
        self.permutation = permutation
        self.class_embeddings: torch.Tensor | None = None
        # the ground truth of each image, found by its pixels
        self.labels = {}
        for s in dataset.samples:
            try:
                self.labels[self._image_key(read_rgb(s.image))] = dataset.load_label(s)
            except (OSError, ValueError):
                continue  # a broken file: the evaluation reports it, this model never sees it

    @staticmethod
    def _image_key(image) -> str:
        return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)))
                for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)

    def logit_scale_exp(self) -> torch.Tensor:
        return torch.tensor(100.0)

    def attach(self, predictor) -> GroundTruthModel:
        self.class_embeddings = predictor.classifier.class_embeddings
        return self

    def embed_masks(self, image, masks) -> torch.Tensor:
        labels = self.labels[self._image_key(image)]
        out = torch.zeros(len(masks), self.dim)
        for i, m in enumerate(np.asarray(masks)):
            under = labels[m & (labels != IGNORE)]
            if under.size == 0 or m.all():
                continue  # the whole-image row and masks on ignore pixels only: no class
            c = int(np.bincount(under).argmax())
            out[i] = self.class_embeddings[c if self.permutation is None else int(self.permutation[c])]
        return out
