"""pipeline.sam's pure helpers: clean-up equal to segment-anything's (OpenCV) one, stability, pixel-budget slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils import amg

from pipeline import sam


def _reference_clean(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """segment-anything's own two-step clean-up (cv2 connected components), as its mask generator runs it."""
    mask, holes = amg.remove_small_regions(mask, min_area, mode="holes")
    mask, islands = amg.remove_small_regions(mask, min_area, mode="islands")
    return mask, holes or islands



@pytest.mark.parametrize("min_area", [1, 4, 9, 40])
def test_remove_small_regions_equals_segment_anything(min_area):
    rng = np.random.default_rng(min_area)
    masks = np.concatenate([rng.random((6, 37, 53)) < np.linspace(0.2, 0.8, 6)[:, None, None],
                            np.zeros((1, 37, 53), bool), np.ones((1, 37, 53), bool)])
    out, changed = sam.remove_small_regions(masks, min_area)
    for m, o, c in zip(masks, out, changed, strict=True):
        want, want_changed = _reference_clean(m, min_area)
        assert (o == want).all()
        assert c == want_changed
    assert changed[:6].any() == (min_area > 1)  # no region is under 1 px; the random masks have small ones


def test_only_small_islands_keep_the_first_largest():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True  # 4 px, first in raster order
    mask[10:12, 15:17] = True  # 4 px, a tie
    mask[16, 1] = True  # 1 px
    out, changed = sam.remove_small_regions(torch.from_numpy(mask[None]), 10)
    want, _ = _reference_clean(mask, 10)
    assert changed[0] and (out[0] == want).all() and out[0].sum() == 4 and out[0][2:4, 2:4].all()


def test_serpentine_mask_is_one_region():
    """The worst case of the old label propagation (hundreds of passes): one long winding component."""
    mask = np.zeros((64, 64), bool)
    mask[::4] = True
    mask[1::8, -1] = mask[2::8, -1] = mask[3::8, -1] = True
    mask[5::8, 0] = mask[6::8, 0] = mask[7::8, 0] = True
    out, changed = sam.remove_small_regions(mask[None], 100)
    assert not changed[0] and (out[0] == mask).all()
    big = int(mask.sum()) + 1  # every region small: holes filled, the one island kept
    assert (sam.remove_small_regions(mask[None], big)[0][0] == _reference_clean(mask, big)[0]).all()


def test_zero_area_is_a_no_op_and_input_is_not_modified():
    masks = np.random.default_rng(0).random((2, 9, 9)) < 0.5
    before = masks.copy()
    out, changed = sam.remove_small_regions(masks, 0)
    assert (out == before).all() and not changed.any()
    sam.remove_small_regions(masks, 50)
    assert (masks == before).all()


def test_stability_score_matches_segment_anything():
    logits = torch.randn(5, 31, 47) * 3
    ours = sam.stability_score(logits, 0.0, 1.0)
    theirs = amg.calculate_stability_score(logits, 0.0, 1.0)
    assert torch.allclose(ours, theirs.float())
    assert sam.stability_score(torch.tensor([[[5.0, 0.5], [-0.5, -5.0]]]), 0.0, 1.0).tolist() == pytest.approx([1 / 3])
    assert sam.stability_score(torch.full((1, 4, 4), -9.0), 0.0, 1.0).tolist() == [0.0]  # empty: 0, not NaN


@pytest.mark.parametrize(("n", "pixels", "budget", "cap", "sizes"), [
    (32, 640 * 480, 1 << 26, 32, [32]),
    (32, 4000 * 3000, 1 << 26, 32, [5] * 6 + [2]),
    (3, 10**9, 1 << 26, 32, [1, 1, 1]),  # never fewer than one prompt
    (10, 10, 100, 4, [4, 4, 2]),
    (0, 10, 100, 4, []),
])
def test_prompt_chunks_bound_the_upscaled_pixels(n, pixels, budget, cap, sizes):
    chunks = list(sam.prompt_chunks(n, pixels, budget, cap))
    assert [c.stop - c.start for c in chunks] == sizes
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(n))
