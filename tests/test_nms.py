"""Mask NMS on RLE keeps exactly what a brute-force greedy NMS over pycocotools.mask.iou keeps,
and no text of a suppressed mask is lost."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from pipeline.nms import mask_nms, merge_texts, nms_keep
from pipeline.text import text_key
from shards import rle as rle_utils
from shards.schema import Segment, Text


def _seg(rle: dict, score: float, *texts: tuple[str, str, float], id: int = 0) -> Segment:
    return Segment(id=id, rle=rle, bbox=[0.0, 0.0, 1.0, 1.0], area=1, texts=[Text(*t) for t in texts], score=score)


def brute_force_keep(rles: list[dict], scores: list[float], threshold: float) -> list[int]:
    """The textbook loop: candidates by descending score (ties by index), one IoU call per pair."""
    order = sorted(range(len(rles)), key=lambda i: (-scores[i], i))
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    kept: list[int] = []
    for i in order:
        if all(mask_utils.iou([coco[i]], [coco[k]], [0])[0][0] <= threshold for k in kept):
            kept.append(i)
    return kept


@st.composite
def mask_sets(draw):
    h, w = draw(st.integers(4, 24)), draw(st.integers(4, 24))
    n = draw(st.integers(0, 14))
    masks = []
    for _ in range(n):
        x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        x1, y1 = draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))
        m = np.zeros((h, w), dtype=bool)
        m[y0:y1, x0:x1] = True
        if draw(st.booleans()):  # punch a random hole so masks are not all boxes
            m[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = False
        masks.append(m)
    # scores from a small set so ties happen
    scores = [draw(st.sampled_from([0.1, 0.5, 0.5, 0.7, 0.9, 1.0])) for _ in range(n)]
    threshold = draw(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]))
    return masks, scores, threshold


@settings(max_examples=150, deadline=None)
@given(mask_sets(), st.sampled_from([1, 2, 5, 256]))
def test_keeps_the_brute_force_set(case, block):
    masks, scores, threshold = case
    rles = rle_utils.encode(np.stack(masks)) if masks else []
    keep, owner = nms_keep(rles, scores, threshold, block=block)
    assert list(keep) == brute_force_keep(rles, scores, threshold)
    kept = set(keep.tolist())
    for i, o in enumerate(owner):  # every suppressed mask went to a kept mask it overlaps enough
        assert o in kept
        if i != o:
            assert rle_utils.iou([rles[i]], [rles[o]])[0, 0] > threshold


@settings(max_examples=60, deadline=None)
@given(mask_sets())
def test_texts_of_suppressed_masks_are_merged(case):
    masks, scores, threshold = case
    rles = rle_utils.encode(np.stack(masks)) if masks else []
    articles = ("a ", "the ", "The ", "")
    segs = [_seg(r, s, (f"{articles[i % 4]}Thing {i % 3}", f"src{i % 3}", s), id=i)
            for i, (r, s) in enumerate(zip(rles, scores, strict=True))]
    out = mask_nms(segs, threshold)
    assert len(out) == len(brute_force_keep(rles, scores, threshold))
    before = {text_key(t.text) for s in segs for t in s.texts}
    after = {text_key(t.text) for s in out for t in s.texts}
    assert before == after
    for s in out:  # one entry per text within a segment
        keys = [text_key(t.text) for t in s.texts]
        assert len(keys) == len(set(keys))


def test_merge_texts_dedupes_keeps_max_score_and_sources():
    merged = merge_texts([Text("a red car", "coco", 1.0)],
                         [Text("A  red car", "llava:objects", 0.4), Text("a wheel", "llava:parts", 0.3)],
                         [Text("a wheel", "llava:parts", 0.6)])
    by = {text_key(t.text): t for t in merged}
    assert set(by) == {"red car", "wheel"}
    assert by["red car"].score == 1.0 and by["red car"].source == "coco+llava:objects"
    assert by["wheel"].score == 0.6 and by["wheel"].source == "llava:parts"


def test_texts_merge_as_the_phrase_stage_dedups():
    """"a man", "the man" and "The man." are one text to the phrase stage, so one text after NMS."""
    merged = merge_texts([Text("a man", "llava:objects", 0.5)], [Text("the man", "coco", 0.9)],
                         [Text("The man.", "vg", 0.7), Text("men", "vg", 0.7)])
    assert merged == [Text("the man", "llava:objects+coco+vg", 0.9), Text("men", "vg", 0.7)]


def test_duplicate_masks_merge_into_the_higher_score():
    m = np.zeros((20, 30), dtype=bool)
    m[2:12, 3:20] = True
    m2 = m.copy()
    m2[11, 3:20] = False  # IoU ~0.94
    other = np.zeros_like(m)
    other[15:19, 22:29] = True
    rles = rle_utils.encode(np.stack([m, m2, other]))
    segs = [_seg(rles[0], 0.6, ("a man", "llava:scene", 0.6)), _seg(rles[1], 0.9, ("a person", "coco", 1.0)),
            _seg(rles[2], 0.5, ("a cup", "vg", 0.5))]
    out = mask_nms(segs, 0.8)
    assert [s.score for s in out] == [0.9, 0.5]
    assert {t.text for t in out[0].texts} == {"a person", "a man"}
    assert mask_nms(segs, 0.99)[0].texts == segs[1].texts  # under the threshold nothing merges


def test_small_blocks_give_the_same_keep_set_and_owners():
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 16, 16), dtype=bool)
    for m in masks:
        x, y = rng.integers(0, 8, 2)
        m[y:y + 8, x:x + 8] = True
    rles = rle_utils.encode(masks)
    scores = rng.random(40).tolist()
    keep, owner = nms_keep(rles, scores, 0.5)
    for block in (1, 3, 7):
        k, o = nms_keep(rles, scores, 0.5, block=block)
        assert np.array_equal(k, keep) and np.array_equal(o, owner)
    assert list(keep) == brute_force_keep(rles, scores, 0.5)
