"""Class-name text embeddings and per-mask class probabilities.

Texts come from the model's frozen CLIP text tower (``USEModel.encode_text``, the tower the segment
embeddings were trained against). Each class has one or more synonyms ("wall, walls, brick wall");
each synonym is put in every prompt template, embedded, and the template embeddings are averaged
and re-normalised (CLIP's zero-shot recipe). Synonyms are then combined per class by

- ``mean`` (default; SED, FC-CLIP): the class embedding is the normalised mean of its synonyms';
- ``max`` (ProxyCLIP): a mask's class score is its best cosine similarity over the class's synonyms.

Probabilities are ``softmax(logit_scale * cos)`` over the classes, with the model's own learned
``logit_scale`` (the temperature of its contrastive loss).

Templates: ``imagenet80`` are CLIP's 80 ImageNet templates (open_clip's
``OPENAI_IMAGENET_TEMPLATES``; used by SED and ProxyCLIP); ``identity`` is the bare class name, for
models trained on bare names (the demo model); a list of ``{}`` format strings is taken as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "identity": ("{}",),
    "photo": ("a photo of a {}.",),
}


class TextModel(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...
    def logit_scale_exp(self) -> torch.Tensor: ...


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named template set or a list of ``{}`` format strings."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}: {', '.join(TEMPLATE_SETS)} or a list of '{{}}' strings")
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out or not all("{}" in t for t in out):
        raise ValueError("prompt templates must be a non-empty list of strings holding '{}'")
    return out


class TextClassifier:
    """Class text embeddings of one vocabulary, and mask embeddings -> class probabilities."""

    def __init__(self, model: TextModel, vocabulary: Sequence[Sequence[str]], templates: str | Sequence[str] = "imagenet80",
                 combine: str = "mean", batch_size: int = 256):
        if combine not in ("mean", "max"):
            raise ValueError(f"combine must be 'mean' or 'max', got {combine!r}")
        if not vocabulary or any(len(v) == 0 for v in vocabulary):
            raise ValueError("every class needs at least one name")
        self.combine = combine
        self.templates = resolve_templates(templates)
        self.num_classes = len(vocabulary)
        synonyms = [s for v in vocabulary for s in v]
        owner = [c for c, v in enumerate(vocabulary) for _ in v]
        texts = [t.format(s) for s in synonyms for t in self.templates]
        chunks = [model.encode_text(texts[i:i + batch_size]).float() for i in range(0, len(texts), batch_size)]
        per_template = torch.cat(chunks).reshape(len(synonyms), len(self.templates), -1)
        #: ``[n_synonyms, D]`` normalised template means, and the class of each row
        self.synonym_embeddings = F.normalize(per_template.mean(dim=1), dim=-1)
        self.synonym_class = torch.tensor(owner, device=self.synonym_embeddings.device)
        summed = torch.zeros(self.num_classes, self.synonym_embeddings.shape[1], device=self.synonym_embeddings.device)
        summed.index_add_(0, self.synonym_class, self.synonym_embeddings)
        #: ``[K, D]`` normalised mean of each class's synonyms (the ``mean`` rule)
        self.class_embeddings = F.normalize(summed, dim=-1)
        self.logit_scale = float(model.logit_scale_exp().detach())

    def logits(self, mask_embeddings: torch.Tensor) -> torch.Tensor:
        """``[S, D]`` normalised mask embeddings -> ``[S, K]`` scaled cosine similarities."""
        emb = mask_embeddings.float().to(self.class_embeddings.device)
        if self.combine == "mean":
            return self.logit_scale * emb @ self.class_embeddings.T
        sims = emb @ self.synonym_embeddings.T
        out = torch.full((emb.shape[0], self.num_classes), float("-inf"), device=emb.device)
        out.scatter_reduce_(1, self.synonym_class.expand(emb.shape[0], -1), sims, reduce="amax")
        return self.logit_scale * out

    def probabilities(self, mask_embeddings: torch.Tensor) -> torch.Tensor:
        """``[S, K]`` softmax over classes of :meth:`logits`."""
        return torch.softmax(self.logits(mask_embeddings), dim=-1)
