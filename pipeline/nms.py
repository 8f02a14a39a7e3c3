"""Mask NMS on COCO RLE: drop near-duplicate segments, keep every text they carried.

Several phrases often ground to the same object ("a man", "a man in a red shirt") and SAM turns
each box into nearly the same mask; human annotations can also repeat a model mask. Boxes are a
poor proxy for overlap of thin or concave objects, so overlap is mask IoU computed on the RLEs
(``shards.rle.iou``; pycocotools skips pairs whose boxes do not meet, so no box pre-filter is needed).

Greedy NMS in descending score order (ties keep input order): a segment is suppressed when its IoU
with an already kept segment exceeds ``threshold``; its texts move to the first (highest-scored)
kept segment that suppresses it. IoU is computed per block of candidates against all masks kept
so far (and within the block), so the Python loop is one vectorised row per kept mask and no
``n x n`` matrix is ever built for images with thousands of masks.

Texts are merged by normalised text (case and whitespace folded): one entry per text, with the
highest score seen and the sources of every duplicate joined by ``+`` in order of first appearance
(``coco+llava:objects``), so that no provenance is lost and the trainer never samples the same
text twice for one segment.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shards import rle as rle_utils

#: Candidates per block: IoU is computed block x kept-so-far and block x block, never n x n.
BLOCK = 256


def text_key(text: str) -> str:
    return " ".join(text.lower().split())


def merge_texts(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Union of text lists, one entry per normalised text (max score, all sources kept)."""
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, list[str]] = {}
    for group in groups:
        for t in group:
            k = text_key(t["text"])
            if not k:
                continue
            srcs = sources.setdefault(k, [])
            for s in str(t.get("source", "")).split("+"):
                if s and s not in srcs:
                    srcs.append(s)
            score = float(t.get("score", 1.0))
            if k not in merged or score > merged[k]["score"]:
                merged[k] = {"text": t["text"], "source": "", "score": score}
    for k, entry in merged.items():
        entry["source"] = "+".join(sources[k])
    return list(merged.values())


def nms_keep(rles: list[dict[str, Any]], scores: np.ndarray | list[float], threshold: float,
             block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Greedy mask NMS. Returns the kept indices (in score order) and, for every input, the index
    of the kept mask it went to (itself when kept).

    Candidates are taken in score order ``block`` at a time: one IoU call against every mask kept
    so far suppresses a block's candidates at once (the first kept mask over the threshold owns
    each), then a greedy pass over the block's own IoU matrix settles the rest. Only candidate x
    kept and in-block pairs are computed, which is what a sequential greedy NMS looks at anyway.
    """
    n = len(rles)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ranked = [rles[i] for i in order]
    owner = np.arange(n)  # in ranked positions
    kept: list[int] = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        cand = ranked[start:stop]
        alive = np.ones(stop - start, dtype=bool)
        if kept:
            over = rle_utils.iou(cand, [ranked[k] for k in kept]) > threshold
            hit = over.any(axis=1)
            owner[start:stop][hit] = np.asarray(kept)[over.argmax(axis=1)[hit]]
            alive &= ~hit
        inner = rle_utils.iou(cand, cand)
        for j in np.flatnonzero(alive):
            if not alive[j]:
                continue
            kept.append(start + int(j))
            hit = alive & (inner[j] > threshold)
            hit[: j + 1] = False
            owner[start:stop][hit] = start + int(j)
            alive &= ~hit
    owner_orig = np.empty(n, dtype=np.int64)
    owner_orig[order] = order[owner]
    return order[np.asarray(kept, dtype=np.int64)], owner_orig


def mask_nms(segments: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """NMS over shard segment dicts (``rle``, ``score``, ``texts``...); the texts of suppressed
    segments are merged into their keeper. Returns new dicts in descending score order."""
    if not segments:
        return []
    keep, owner = nms_keep([s["rle"] for s in segments], [s.get("score", 1.0) for s in segments], threshold)
    groups: dict[int, list[list[dict[str, Any]]]] = {int(k): [] for k in keep}
    for i, o in enumerate(owner):
        if i != o:
            groups[int(o)].append(segments[i]["texts"])
    return [{**segments[k], "texts": merge_texts(segments[k]["texts"], *groups[int(k)])} for k in keep]
