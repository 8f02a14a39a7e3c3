"""Semantic segmentation metrics from one confusion matrix, by detectron2's and mmsegmentation's rules.

The matrix is ``(K + 1) x (K + 1)`` int64, accumulated image by image with one ``np.bincount``:
**rows are predictions, columns are ground truth**, and ground-truth ignore pixels go to the extra
last column ``K`` (predictions are always ``0..K-1``). This is detectron2's ``SemSegEvaluator``
(``detectron2/evaluation/sem_seg_evaluation.py``, ``process``: ``bincount((K + 1) * pred + gt)``).
Matrices of several images, workers or nodes are summed.

**detectron2 rule** (``SemSegEvaluator.evaluate``, since 2022; the rule of the published figures of
CAT-Seg, SED, FC-CLIP, SAN, OVSeg): the extra row and column are dropped, so ignore pixels count
nowhere. With ``tp = diag``, ``gt_k`` the column sums and ``pred_k`` the row sums of the ``K x K`` block:

- ``acc_k = tp_k / gt_k`` and ``IoU_k = tp_k / (gt_k + pred_k - tp_k)``, defined only for classes
  with ground-truth pixels (``gt_k > 0``); other classes are NaN and left out of every mean, even
  when they were predicted (a false positive of an absent class lowers no IoU of its own, only the
  IoU of the classes whose pixels it took);
- ``mIoU`` = mean of the defined IoUs, ``mAcc`` = mean of the defined accuracies,
  ``pAcc = sum(tp) / sum(gt)``, ``fwIoU = sum_k (gt_k / sum(gt)) * IoU_k`` over defined classes.

**mmsegmentation rule** (``mmseg.evaluation.metrics.IoUMetric``, ``mIoU_mmseg``): per class
``intersect / union`` over non-ignored pixels, NaN only when the union is empty, ``nanmean``; a
class that is predicted but absent from the ground truth has IoU 0 and *is* averaged. Papers differ
in which rule they use; on ADE20K-847 (many rare classes, many predicted-but-absent) the two differ
most, so both are reported.

Values are fractions in ``[0, 1]`` (detectron2 prints percentages: multiply by 100).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ConfusionMatrix:
    """A ``(K + 1) x (K + 1)`` int64 matrix, rows = prediction, columns = ground truth (``K`` = ignore)."""

    def __init__(self, num_classes: int, matrix: np.ndarray | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        n = self.num_classes + 1
        self.matrix = np.zeros((n, n), dtype=np.int64) if matrix is None else np.asarray(matrix, dtype=np.int64)
        if self.matrix.shape != (n, n):
            raise ValueError(f"confusion matrix must be {n}x{n}, got {self.matrix.shape}")

    def update(self, pred: np.ndarray, gt: np.ndarray, ignore_mask: np.ndarray | None = None) -> None:
        """Add one image. ``pred`` in ``0..K-1``; ``gt`` in ``0..K-1``, and every pixel where
        ``ignore_mask`` is True (or whose ``gt`` is outside ``0..K-1``) counts as ignore."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        k = self.num_classes
        p = pred.reshape(-1).astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predictions must lie in 0..{k - 1}, got {p.min()}..{p.max()}")
        g = gt.reshape(-1).astype(np.int64)
        invalid = (g < 0) | (g >= k)
        if ignore_mask is not None:
            invalid |= np.asarray(ignore_mask, dtype=bool).reshape(-1)
        g = np.where(invalid, k, g)
        self.matrix += np.bincount((k + 1) * p + g, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add a {other.num_classes}-class matrix to a {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def scores(self) -> Scores:
        return compute_scores(self.matrix)


@dataclass
class Scores:
    """Metrics of one confusion matrix (fractions; NaN where a class has no ground truth)."""

    mIoU: float
    mAcc: float
    pAcc: float
    fwIoU: float
    mIoU_mmseg: float
    iou: np.ndarray          # [K], detectron2 rule
    acc: np.ndarray          # [K]
    iou_mmseg: np.ndarray    # [K], mmsegmentation rule
    gt_pixels: np.ndarray    # [K]
    pred_pixels: np.ndarray  # [K], on non-ignored pixels


def compute_scores(matrix: np.ndarray) -> Scores:
    """Both rules of the module docstring from a ``(K + 1) x (K + 1)`` matrix (rows = prediction)."""
    m = np.asarray(matrix, dtype=np.int64)[:-1, :-1]
    tp = np.diag(m).astype(float)
    pos_gt = m.sum(axis=0).astype(float)
    pos_pred = m.sum(axis=1).astype(float)
    k = len(tp)
    acc = np.full(k, np.nan)
    iou = np.full(k, np.nan)
    acc_valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total = pos_gt.sum()
    nan = float("nan")
    miou = float(iou[iou_valid].mean()) if iou_valid.any() else nan
    macc = float(acc[acc_valid].mean()) if acc_valid.any() else nan
    fwiou = float((iou[iou_valid] * pos_gt[iou_valid] / total).sum()) if total > 0 else nan
    pacc = float(tp.sum() / total) if total > 0 else nan
    iou_mm = np.full(k, np.nan)
    has_union = union > 0
    iou_mm[has_union] = tp[has_union] / union[has_union]
    miou_mm = float(iou_mm[has_union].mean()) if has_union.any() else nan
    return Scores(mIoU=miou, mAcc=macc, pAcc=pacc, fwIoU=fwiou, mIoU_mmseg=miou_mm, iou=iou, acc=acc,
                  iou_mmseg=iou_mm, gt_pixels=pos_gt.astype(np.int64), pred_pixels=pos_pred.astype(np.int64))
