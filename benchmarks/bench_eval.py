"""Evaluation: per-pixel vote + confusion update per ADE20K-size image (issue 8).

Ours: :func:`evaluation.aggregate.aggregate` (distinct coverage sets of the masks, one small matmul)
then :meth:`evaluation.metrics.ConfusionMatrix.update` (one ``bincount``). Baseline: the
straightforward per-mask numpy loop -- a ``K x H x W`` score array, each mask's probabilities added
to its pixels, ``argmax`` -- then the same confusion update. The image is an ADE20K validation image
at the inference size (683x512 -> 854x640, SED's 640 short side), 150 classes, with SAM-like masks:
a 40-region partition (stuff-like masks that cover every pixel) plus 80 overlapping ellipses
(objects and parts), 120 masks in all, and a 250-mask case (dense proposals). Both must give the
same labels (asserted).
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import Entry, Section, compare, entry_table, machine
from evaluation.aggregate import aggregate
from evaluation.metrics import ConfusionMatrix

H, W, K = 640, 854, 150
CASES = (("ade-854x640-120-masks", 40, 80, 3), ("ade-854x640-250-masks", 50, 200, 2))


def sam_like_masks(h: int, w: int, regions: int, ellipses: int, seed: int = 0) -> np.ndarray:
    """A Voronoi partition into ``regions`` masks plus ``ellipses`` random ellipses (overlapping)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    seeds = rng.uniform((0, 0), (h, w), size=(regions, 2))
    nearest = np.zeros((h, w), np.int64)
    best = np.full((h, w), np.inf)
    for i, (cy, cx) in enumerate(seeds):
        d = (yy - cy) ** 2 + (xx - cx) ** 2
        closer = d < best
        best[closer], nearest[closer] = d[closer], i
    masks = [nearest == i for i in range(regions)]
    for _ in range(ellipses):
        cy, cx = rng.uniform((0, 0), (h, w))
        ry, rx = rng.uniform(8, h / 4), rng.uniform(8, w / 4)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
    return np.stack(masks)


def per_mask_loop(masks: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The baseline vote: one pass per mask over a ``K x H x W`` score array."""
    score = np.zeros((probs.shape[1], *masks.shape[1:]), np.float32)
    for m, p in zip(masks, probs, strict=True):
        score[:, m] += p[:, None]
    return score.argmax(axis=0)


def run() -> Section:
    box = machine()
    rng = np.random.default_rng(1)
    gt = rng.integers(0, K, size=(H, W))
    gt[rng.random((H, W)) < 0.1] = -1  # ignore pixels
    entries, rows = [], ["| case | masks | per-mask loop (s) | ours (s) | speed-up |", "|---|---:|---:|---:|---:|"]
    for name, regions, ellipses, repeat in CASES:
        masks = sam_like_masks(H, W, regions, ellipses)
        probs = rng.dirichlet(np.full(K, 0.3), size=len(masks)).astype(np.float32)

        def baseline(masks=masks, probs=probs):
            pred = per_mask_loop(masks, probs)
            cm = ConfusionMatrix(K)
            cm.update(pred, gt)
            return pred

        def ours(masks=masks, probs=probs):
            pred = aggregate(masks, probs)
            cm = ConfusionMatrix(K)
            cm.update(pred, gt)
            return pred

        base, mine = compare(baseline, ours, repeat=repeat)
        assert np.array_equal(base.result, mine.result), f"votes differ on {name}"
        e = Entry.cost(f"eval-vote-{name}", base.median, mine.median, "s", 10.0,
                       f"{len(masks)} masks, {K} classes, {W}x{H}; same labels (asserted); per-mask loop "
                       f"{base.spread()}, ours {mine.spread()}")
        entries.append(e)
        rows.append(f"| {name} | {len(masks)} | {base.median:.3f} | {mine.median:.4f} | {e.ratio:.1f}x |")
    md = "\n".join([
        "## Evaluation: per-pixel vote + confusion update per image", "",
        "Per ADE20K-size image at the inference size (854x640), 150 classes, SAM-like masks (a partition plus "
        "overlapping ellipses). Baseline: a per-mask numpy loop over a K x H x W score array; ours: distinct "
        "coverage sets (`evaluation.aggregate`), then one `bincount` confusion update for both. "
        f"Machine: {box.describe()}.", "", *rows, "", *entry_table(entries), ""])
    return Section(md, entries)
