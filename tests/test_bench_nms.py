"""The IoU bound behind ``pipeline.nms`` never drops a pair that could pass the threshold.

``tests/test_nms.py`` checks keep sets against the brute-force loop on small random cases; here the
bound itself is checked against every pair's exact pycocotools IoU, on benchmark-like masks and on
the edge cases (empty masks, identical masks, threshold 0, masks of another image size).
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from benchmarks.bench_pipeline import brute_force_keep, random_masks
from pipeline.nms import _bound_pairs, nms_keep
from shards import rle as rle_utils


def _exact(rles: list[dict]) -> np.ndarray:
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    return np.asarray(mask_utils.iou(coco, coco, [0] * len(coco)), dtype=np.float64).reshape(len(rles), len(rles))


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("block", [1, 7, 256])
def test_bound_pairs_hold_every_pair_over_the_threshold(threshold, block):
    rles, _ = random_masks(60, h=48, w=64, seed=3)
    exact = _exact(rles)
    i, j = _bound_pairs(rle_utils.bbox(rles), rle_utils.area(rles), threshold, block)
    found = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist(), strict=True)}
    assert len(found) == len(i), "a pair was listed twice"
    need = {(a, b) for a, b in zip(*np.nonzero(exact > threshold), strict=True) if a < b}
    assert need <= found
    assert all(a != b for a, b in found)


def test_edge_cases_keep_the_brute_force_set():
    h, w = 20, 30
    m = np.zeros((6, h, w), dtype=bool)
    m[1, 2:9, 3:12] = True
    m[2] = m[1]  # identical
    m[3, 2:9, 3:11] = True  # near copy
    m[5, 15:, 20:] = True  # far away; m[0], m[4] empty
    rles = rle_utils.encode(m)
    other = rle_utils.encode_one(np.ones((h + 1, w), dtype=bool))  # another image size: pycocotools says -1
    rles.append(other)
    scores = np.array([0.9, 0.5, 0.5, 0.7, 0.9, 0.1, 0.6])
    for threshold in (0.0, 0.5, 0.85, 1.0):
        keep, owner = nms_keep(rles, scores, threshold)
        assert list(keep) == brute_force_keep(rles, scores, threshold), threshold
        assert set(owner.tolist()) <= set(keep.tolist())


def test_benchmark_masks_keep_the_brute_force_set():
    rles, scores = random_masks(150, h=120, w=160, seed=1)
    for threshold in (0.5, 0.8):
        keep, _ = nms_keep(rles, scores, threshold, block=32)
        assert list(keep) == brute_force_keep(rles, scores, threshold)
