"""evaluation.metrics: detectron2's SemSegEvaluator rule (and mmseg's) on a hand case and on random maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.metrics import ConfusionMatrix, compute_scores

IGN = 255


def test_hand_case_detectron2_and_mmseg():
    """4 classes; class 3 is predicted once but absent from the ground truth; one ignore pixel.

    pixels (pred, gt): (0,0) (1,0) (1,1) (1,1) (3,2) and (2, ignore).
    tp = [1, 2, 0, 0]; gt = [2, 2, 1, 0]; pred on non-ignored pixels = [1, 3, 0, 1].
    detectron2: IoU = [1/2, 2/3, 0, undefined] -> mIoU = (1/2 + 2/3 + 0) / 3 = 7/18;
    acc = [1/2, 1, 0] -> mAcc = 1/2; pAcc = 3/5; fwIoU = 2/5 * 1/2 + 2/5 * 2/3 + 1/5 * 0 = 7/15.
    mmseg: class 3 has IoU 0/(0 + 1 - 0) = 0 and counts -> (1/2 + 2/3 + 0 + 0) / 4 = 7/24.
    """
    gt = np.array([[0, 0, 1], [1, 2, IGN]])
    pred = np.array([[0, 1, 1], [1, 3, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt, ignore_mask=gt == IGN)
    # rows = prediction, columns = ground truth, last column = ignore
    assert cm.matrix[1, 0] == 1 and cm.matrix[3, 2] == 1 and cm.matrix[2, 4] == 1 and cm.matrix[1, 1] == 2
    s = cm.scores()
    assert s.mIoU == pytest.approx(7 / 18)
    assert s.mAcc == pytest.approx(1 / 2)
    assert s.pAcc == pytest.approx(3 / 5)
    assert s.fwIoU == pytest.approx(7 / 15)
    assert s.mIoU_mmseg == pytest.approx(7 / 24)
    assert np.allclose(s.iou[:3], [1 / 2, 2 / 3, 0]) and math.isnan(s.iou[3])
    assert s.iou_mmseg[3] == 0


def test_out_of_range_gt_is_ignore_and_bad_predictions_raise():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 1]), np.array([0, 65535, 1]))
    assert cm.matrix[1, 2] == 1 and cm.scores().mIoU == 1.0
    with pytest.raises(ValueError, match="0..1"):
        cm.update(np.array([2]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def _independent(preds, gts, k):
    """Per class with boolean masks, no confusion matrix."""
    inter = np.zeros(k)
    gt_n = np.zeros(k)
    pred_n = np.zeros(k)
    for p, g in zip(preds, gts, strict=True):
        valid = g != IGN
        for c in range(k):
            inter[c] += np.sum((p == c) & (g == c) & valid)
            gt_n[c] += np.sum((g == c) & valid)
            pred_n[c] += np.sum((p == c) & valid)
    present = gt_n > 0
    iou = [inter[c] / (gt_n[c] + pred_n[c] - inter[c]) for c in range(k) if present[c]]
    acc = [inter[c] / gt_n[c] for c in range(k) if present[c]]
    union = gt_n + pred_n - inter
    mm = [inter[c] / union[c] for c in range(k) if union[c] > 0]
    total = gt_n.sum()
    fw = sum(gt_n[c] / total * inter[c] / (gt_n[c] + pred_n[c] - inter[c]) for c in range(k) if present[c])
    return {"mIoU": np.mean(iou), "mAcc": np.mean(acc), "pAcc": inter.sum() / total, "fwIoU": fw,
            "mIoU_mmseg": np.mean(mm)}


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 9), n_images=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       ignore_frac=st.floats(0, 0.5), absent=st.integers(0, 3))
def test_matches_independent_computation(k, n_images, seed, ignore_frac, absent):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    cm = ConfusionMatrix(k)
    for _ in range(n_images):
        h, w = rng.integers(1, 12, size=2)
        gt = rng.integers(0, max(1, k - absent), size=(h, w))  # the last `absent` classes never in the gt
        gt[rng.random((h, w)) < ignore_frac] = IGN
        pred = rng.integers(0, k, size=(h, w))
        preds.append(pred)
        gts.append(gt)
        cm.update(pred, gt, ignore_mask=gt == IGN)
    if all((g == IGN).all() for g in gts):
        assert math.isnan(cm.scores().mIoU)
        return
    want = _independent(preds, gts, k)
    s = cm.scores()
    for key, value in want.items():
        assert getattr(s, key) == pytest.approx(value), key
    # summing matrices (workers, nodes) equals accumulating in one
    halves = ConfusionMatrix(k), ConfusionMatrix(k)
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        halves[i % 2].update(p, g, ignore_mask=g == IGN)
    total = halves[0]
    total += halves[1]
    assert np.array_equal(total.matrix, cm.matrix)
    assert compute_scores(total.matrix).mIoU == pytest.approx(s.mIoU)
