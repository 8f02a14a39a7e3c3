"""Phrase grounding with Grounding DINO (``GroundingDinoForObjectDetection``).

Prompts: the phrases of an image, lower case, joined by " . " and ended by " ." (the format
Grounding DINO was trained on; "." and "?" inside a phrase are blanked because the model treats
them as phrase separators). Phrases are packed greedily, in order, into as few prompts as fit the
text-token limit, counted with the tokenizer itself ([CLS] + tokens and one "." per phrase +
[SEP]); a phrase is never split between prompts, and one that alone exceeds the limit is truncated
in a prompt of its own. The limit is ``max_text_tokens`` capped at the model's ``max_text_len`` and
the BERT position table. All (image, prompt) pairs of a batch run through the model
``prompt_batch_size`` at a time.

Boxes come back from ``post_process_grounded_object_detection`` in absolute pixels of the
EXIF-oriented image (``target_sizes`` are ``(height, width)``). Each box is emitted once for every
phrase of its own prompt whose best token probability passes ``text_threshold``, with that
probability as the text score: in a packed prompt one query often scores high on several phrases
that name the same object ("a man in a red shirt" 0.95, "the man" 0.92), and every one of them is a
text of that object. SAM then turns the copies into near-identical masks, which mask NMS merges into
one segment carrying all the texts (``pipeline.nms``). A box with no phrase above the text threshold
is dropped. Boxes from annotations (Visual Genome regions) already in ``record.boxes`` are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.record import Box, Record, records_of, with_records
from pipeline.retry import retry_per_item
from pipeline.text import normalise
from shards.image import size_of

from .common import chunks, decode_pending, load_model
from .config import GrounderConfig

STAGE = "grounder"


@dataclass
class Prompt:
    """One text prompt for one image: which record row, which phrases (indices into record.phrases)."""

    row: int
    image: Image.Image
    text: str
    phrase_ids: list[int]


class Grounder:
    """Ray Data callable: appends grounded :class:`~pipeline.record.Box` objects to ``record.boxes``."""

    def __init__(self, config: GrounderConfig | dict):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        self.config = config if isinstance(config, GrounderConfig) else GrounderConfig.model_validate(config)
        self.processor, self.model, self.device, self.dtype = load_model(STAGE, self.config, AutoProcessor, GroundingDinoForObjectDetection)
        self.tokenizer = self.processor.tokenizer
        self.max_tokens = min(self.config.max_text_tokens, self.model.config.max_text_len,
                              self.model.config.text_config.max_position_embeddings)
        self.separator_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in (".", "?")}
        self.separator_ids |= {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        prompts: list[Prompt] = []
        pending: list[int] = []
        decoded = decode_pending(batch, records, STAGE, want=lambda r: bool(r.phrases),
                                 policy=self.config.read)
        for i, image in decoded:
            pending.append(i)
            prompts += [Prompt(i, image, text, ids) for text, ids in self.pack(records[i])]
        found: dict[int, list[Box]] = {i: [] for i in pending}
        for group in chunks(prompts, self.config.prompt_batch_size):
            for done, results in retry_per_item(group, lambda g: self.detect(g, records),
                                                lambda p, e: records[p.row].fail(STAGE, e), what=f"{STAGE}: detection",
                                                describe=lambda p: records[p.row].image_id):
                for prompt, boxes in zip(done, results, strict=True):
                    found[prompt.row] += boxes
        for i, boxes in found.items():
            if records[i].failure is not None:
                continue
            boxes.sort(key=lambda b: -b.score)
            records[i].boxes += boxes[: self.config.max_boxes_per_image]
        for r in records:
            if r.failure is None and not r.boxes and not r.segments:
                r.fail(STAGE, "no box above threshold" if r.phrases else "no phrase to ground")
        return with_records(batch, records)

    def pack(self, record: Record) -> list[tuple[str, list[int]]]:
        """``(prompt text, phrase indices)`` per prompt, each under ``self.max_tokens`` tokens."""
        texts = [prompt_phrase(p.text) for p in record.phrases]
        ids = [i for i, t in enumerate(texts) if t]
        if not ids:
            return []
        lengths = self.tokenizer([texts[i] for i in ids], add_special_tokens=False)["input_ids"]
        budget = self.max_tokens - 2  # [CLS] and [SEP]
        packed: list[list[int]] = []
        used = budget + 1
        for i, tokens in zip(ids, lengths, strict=True):
            cost = len(tokens) + 1  # the phrase and its " ."
            if used + cost > budget:
                packed.append([])
                used = 0
            packed[-1].append(i)
            used += cost
        return [(" . ".join(texts[i] for i in group) + " .", group) for group in packed]

    @torch.inference_mode()
    def detect(self, group: list[Prompt], records: list[Record]) -> list[list[Box]]:
        """Boxes with their phrases for each prompt of ``group``."""
        sizes = [size_of(p.image) for p in group]
        inputs = self.processor(images=[p.image for p in group], text=[p.text for p in group], padding="longest",
                                truncation=True, max_length=self.max_tokens, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        input_ids = inputs["input_ids"]
        results = self.processor.post_process_grounded_object_detection(
            outputs, input_ids=input_ids, threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold, target_sizes=sizes)
        out = []
        for b, (prompt, result, (h, w)) in enumerate(zip(group, results, sizes, strict=True)):
            probs = outputs.logits[b].sigmoid()
            kept = (probs.max(dim=-1).values > self.config.box_threshold).nonzero().flatten()
            spans = phrase_spans(input_ids[b].tolist(), self.separator_ids)[: len(prompt.phrase_ids)]
            phrases = records[prompt.row].phrases
            boxes = []
            for q, xyxy in zip(kept.tolist(), result["boxes"].tolist(), strict=True):
                x0, y0, x1, y1 = min(max(xyxy[0], 0.0), w), min(max(xyxy[1], 0.0), h), \
                    min(max(xyxy[2], 0.0), w), min(max(xyxy[3], 0.0), h)
                if x1 - x0 < self.config.min_box_side or y1 - y0 < self.config.min_box_side:
                    continue
                for k, score in grounded_phrases(probs[q], spans, self.config.text_threshold):
                    phrase = phrases[prompt.phrase_ids[k]]
                    boxes.append(Box(xyxy=[x0, y0, x1, y1], text=phrase.text, source=phrase.source, score=score))
            out.append(boxes)
        return out


def prompt_phrase(text: str) -> str:
    """A phrase as it goes into a prompt: :func:`pipeline.text.normalise`d, with no "."/"?" inside
    (phrase separators to the model)."""
    return normalise(" ".join(text.replace(".", " ").replace("?", " ").split()))


def phrase_spans(input_ids: list[int], separator_ids: set[int]) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the phrases of one prompt, split at [CLS]/[SEP]/"."/"?"."""
    spans, start = [], None
    for pos, tok in enumerate(input_ids):
        if tok in separator_ids:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = pos + 1
    return spans


def grounded_phrases(token_probs: torch.Tensor, spans: list[tuple[int, int]],
                     text_threshold: float) -> list[tuple[int, float]]:
    """``(phrase index, best token probability)`` of every phrase of the prompt that a box grounds.

    A phrase is grounded when one of its tokens passes ``text_threshold`` (Grounding DINO's own rule
    for the tokens of a text label); vectorised over the phrases with one segment-max.
    """
    if not spans:
        return []
    owner = torch.full((token_probs.shape[0],), -1, dtype=torch.long)
    for k, (s, e) in enumerate(spans):
        owner[s:e] = k
    inside = owner >= 0
    best = torch.zeros(len(spans), dtype=token_probs.dtype).scatter_reduce(
        0, owner[inside], token_probs.detach().cpu()[inside], reduce="amax", include_self=False)
    return [(k, float(best[k])) for k in (best > text_threshold).nonzero().flatten().tolist()]
