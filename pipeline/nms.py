"""Mask NMS on COCO RLE: drop near-duplicate segments, keep every text they carried.

Several phrases often ground to the same object ("a man", "a man in a red shirt") and SAM turns
each box into nearly the same mask; human annotations can also repeat a model mask. Boxes are a
poor proxy for overlap of thin or concave objects, so overlap is mask IoU computed on the RLEs
(``shards.rle.iou``; pycocotools skips pairs whose boxes do not meet, so no box pre-filter is needed).

Greedy NMS in descending score order (ties keep input order): a segment is suppressed when its IoU
with an already kept segment exceeds ``threshold``; its texts move to the first (highest-scored)
kept segment that suppresses it. Exact, and cheap: a pair can only pass the threshold when an upper
bound of its IoU from areas and boxes does (``m / (a + b - m)``, ``m = min(a, b, box overlap)``), so
the bound is computed vectorised over area-sorted blocks (never an ``n x n`` matrix) and the exact
RLE IoU (pycocotools) only for the few pairs that pass it, against the masks kept so far.

Texts are merged by :func:`pipeline.text.text_key`, the phrase stage's identity of a text (case,
whitespace, edge punctuation and a leading article folded: "a man" and "the man" are one text):
one entry per text, with the text and score of its highest-scored copy and the sources of every
duplicate joined by ``+`` in order of first appearance (``coco+llava:objects``), so that no
provenance is lost and the trainer never samples the same text twice for one segment.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.text import text_key
from shards import rle as rle_utils
from shards.schema import Segment, Text

#: Rows per block of the area/box bound: memory is ``block x window``, never ``n x n``.
BLOCK = 256


def merge_texts(*groups: list[Text]) -> list[Text]:
    """Union of text lists, one entry per :func:`~pipeline.text.text_key` (max score, all sources kept)."""
    merged: dict[str, Text] = {}
    sources: dict[str, list[str]] = {}
    for group in groups:
        for t in group:
            k = text_key(t.text)
            if not k:
                continue
            srcs = sources.setdefault(k, [])
            for s in t.source.split("+"):
                if s and s not in srcs:
                    srcs.append(s)
            if k not in merged or t.score > merged[k].score:
                merged[k] = Text(text=t.text, source="", score=float(t.score))
    return [replace(entry, source="+".join(sources[k])) for k, entry in merged.items()]


def _bound_pairs(boxes: np.ndarray, areas: np.ndarray, threshold: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i != j``, each unordered pair once, whose IoU upper bound exceeds ``threshold``.

    ``|A & B| <= m = min(a, b, box overlap)`` and IoU grows with the intersection, so
    ``IoU <= m / (a + b - m)``; with integer operands both divisions are correctly rounded, so the
    bound in float64 is never below pycocotools' ``(double) i / (double) u``. The bound is at most
    ``min(a, b) / max(a, b)``, so for ``threshold > 0`` a row only needs the columns whose area lies in
    ``[threshold a, a / threshold]``: rows are taken ``block`` at a time in area order and each block
    meets one contiguous window of the area-sorted columns.
    """
    n = len(areas)
    order = np.argsort(areas, kind="stable")
    a = areas[order].astype(np.float64)
    x0, y0 = boxes[order, 0], boxes[order, 1]
    x1, y1 = x0 + boxes[order, 2], y0 + boxes[order, 3]
    rows, cols = [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        if threshold > 0:  # inclusive and a hair wide: the window only has to hold every candidate
            c1 = int(np.searchsorted(a, a[hi - 1] / threshold * (1 + 1e-9), side="right"))
        else:
            c1 = n
        c0 = lo + 1  # unordered pairs once: columns after the row in area order
        if c1 <= c0:
            continue
        r, c = slice(lo, hi), slice(c0, c1)
        iw = np.minimum(x1[r, None], x1[None, c]) - np.maximum(x0[r, None], x0[None, c])
        ih = np.minimum(y1[r, None], y1[None, c]) - np.maximum(y0[r, None], y0[None, c])
        m = np.minimum(np.minimum(a[r, None], a[None, c]), np.clip(iw, 0, None) * np.clip(ih, 0, None))
        bound = m / np.maximum(a[r, None] + a[None, c] - m, 1.0)
        bound[np.arange(lo, hi)[:, None] >= np.arange(c0, c1)[None, :]] = -np.inf  # each pair once
        ri, ci = np.nonzero(bound > threshold)
        rows.append(order[ri + lo])
        cols.append(order[ci + c0])
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def nms_keep(rles: list[dict[str, Any]], scores: np.ndarray | list[float], threshold: float,
             block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Greedy mask NMS. Returns the kept indices (in score order) and, for every input, the index
    of the kept mask it went to (itself when kept).

    The same decisions as the textbook loop (each candidate against every mask kept so far, one
    ``pycocotools.mask.iou`` call each), computing exact IoUs only where :func:`_bound_pairs` says the
    threshold can be passed: a candidate none of whose higher-scored bound partners is kept is
    kept without any IoU call. Areas and boxes come from pycocotools too (one call each, chunked).
    """
    n = len(rles)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    owner = np.arange(n)  # in ranked positions
    if n == 0:
        return order, owner
    i, j = _bound_pairs(rle_utils.bbox(rles), rle_utils.area(rles), threshold, max(1, int(block)))
    ri, rj = rank[i], rank[j]
    early, late = np.minimum(ri, rj), np.maximum(ri, rj)
    by_late = np.lexsort((early, late))  # each candidate's higher-scored partners, best first
    early, late = early[by_late], late[by_late]
    cands, starts = np.unique(late, return_index=True)
    partners = np.split(early, starts[1:]) if len(late) else []
    kept = np.ones(n, dtype=bool)  # in ranked positions; only candidates with partners can lose
    coco = [{"size": list(rles[k]["size"]), "counts": rles[k]["counts"].encode()
             if isinstance(rles[k]["counts"], str) else rles[k]["counts"]} for k in order]
    for c, ps in zip(cands.tolist(), partners, strict=True):
        live = ps[kept[ps]]
        if len(live) == 0:
            continue
        over = np.asarray(mask_utils.iou([coco[c]], [coco[p] for p in live], [0] * len(live))).reshape(-1) > threshold
        if over.any():
            kept[c] = False
            owner[c] = live[int(over.argmax())]
    owner_orig = np.empty(n, dtype=np.int64)
    owner_orig[order] = order[owner]
    return order[kept], owner_orig


def mask_nms(segments: list[Segment], threshold: float) -> list[Segment]:
    """NMS over shard segments; the texts of suppressed segments are merged into their keeper.
    Returns new segments in descending score order (ids unchanged: the caller renumbers)."""
    if not segments:
        return []
    keep, owner = nms_keep([s.rle for s in segments], [s.score for s in segments], threshold)
    groups: dict[int, list[list[Text]]] = {int(k): [] for k in keep}
    for i, o in enumerate(owner):
        if i != o:
            groups[int(o)].append(segments[i].texts)
    return [replace(segments[k], texts=merge_texts(segments[k].texts, *groups[int(k)])) for k in keep]
