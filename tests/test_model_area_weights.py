"""Area weights and batched area-weighted pooling against per-segment Python-loop references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards import rle as rle_utils
from trainer.model import area_weights, area_weights_from_rle, pool_segments, valid_rows


def _reference(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """One segment, independently: upsample every pixel to grid x grid sub-pixels, so patch (i, j)
    is exactly the block of rows [i*H, (i+1)*H) and columns [j*W, (j+1)*W), and count."""
    h, w = mask.shape
    up = mask.to(torch.float64).repeat_interleave(grid, 0).repeat_interleave(grid, 1)  # [H*G, W*G]
    out = torch.zeros(grid, grid, dtype=torch.float64)
    for i in range(grid):
        for j in range(grid):
            out[i, j] = up[i * h:(i + 1) * h, j * w:(j + 1) * w].sum()
    return (out / out.sum()).flatten() if out.sum() > 0 else out.flatten()


def _random_masks(gen: torch.Generator, s: int, h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(s, h, w, dtype=torch.bool)
    for k in range(s):
        y0, x0 = (int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen)))
        y1 = int(torch.randint(y0 + 1, h + 1, (1,), generator=gen))
        x1 = int(torch.randint(x0 + 1, w + 1, (1,), generator=gen))
        masks[k, y0:y1, x0:x1] = True  # a rectangle: usually crosses patch borders
        masks[k] &= torch.rand(h, w, generator=gen) > 0.3  # ragged inside
        masks[k, y0, x0] = True  # never empty
    return masks


@pytest.mark.parametrize(("h", "w", "grid"), [(32, 32, 4), (37, 53, 4), (30, 41, 7), (17, 64, 8), (5, 3, 4)])
def test_matches_loop_reference(h: int, w: int, grid: int) -> None:
    gen = torch.Generator().manual_seed(h * 100 + w)
    masks = _random_masks(gen, 12, h, w)
    masks[0] = True  # full image
    masks[1] = False
    masks[1, h // 2, w // 2] = True  # a single pixel (possibly straddling patches when non-divisible)
    got = area_weights(masks, grid)
    assert got.shape == (12, grid * grid)
    for s in range(12):
        torch.testing.assert_close(got[s].double(), _reference(masks[s], grid), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(12))


def test_divisible_sizes_equal_average_pooling() -> None:
    masks = _random_masks(torch.Generator().manual_seed(0), 5, 48, 64)
    pooled = F.adaptive_avg_pool2d(masks.float()[:, None], 8).flatten(1)
    torch.testing.assert_close(area_weights(masks, 8), pooled / pooled.sum(1, keepdim=True))


def test_full_image_is_uniform_and_tiny_mask_gets_its_patch() -> None:
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[0] = True
    masks[1, 25, 3] = True  # one pixel in patch (row 2, col 0) of a 4x4 grid (10 px patches)
    masks[2, 9:11, 9:11] = True  # 2x2 pixels centred on a corner: a quarter in each of 4 patches
    w = area_weights(masks, 4)
    torch.testing.assert_close(w[0], torch.full((16,), 1 / 16))
    assert w[1, 2 * 4 + 0] == 1.0 and w[1].sum() == 1.0
    torch.testing.assert_close(w[2].view(4, 4)[:2, :2], torch.full((2, 2), 0.25))


def test_pixel_straddling_a_border_is_split() -> None:
    masks = torch.zeros(1, 2, 3, dtype=torch.bool)
    masks[0, 0, 1] = True  # top row, middle of 3 columns: cut in half by the 2-patch border at x = 1.5
    w = area_weights(masks, 2).view(2, 2)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))


def test_empty_masks_zeros_or_raise() -> None:
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 3, 3] = True
    w = area_weights(masks, 4)
    assert torch.equal(valid_rows(w), torch.tensor([True, False])) and torch.all(w[1] == 0)
    with pytest.raises(ValueError, match="empty"):
        area_weights(masks, 4, on_empty="raise")
    assert area_weights(torch.zeros(0, 5, 5, dtype=torch.bool), 4).shape == (0, 16)


def test_from_rle_equals_from_masks() -> None:
    masks = _random_masks(torch.Generator().manual_seed(3), 70, 23, 31)  # > one 64-chunk
    rles = rle_utils.encode(masks.numpy())
    torch.testing.assert_close(area_weights_from_rle(rles, 6), area_weights(masks, 6))
    assert area_weights_from_rle([], 6).shape == (0, 36)


def test_batched_pooling_matches_loop() -> None:
    """Value and gradient equal the per-segment loop; sparse rows, an empty row and a cls token to skip."""
    gen = torch.Generator().manual_seed(1)
    b, p, d, s = 4, 16, 8, 11
    tokens = torch.randn(b, 1 + p, d, generator=gen, requires_grad=True)
    weights = torch.softmax(torch.randn(s, p, generator=gen), dim=1)
    weights[::2, 5:] = 0  # sparse rows, as area weights are
    weights[4] = 0  # an empty mask: zero row
    image_index = torch.tensor([3, 0, 3, 3, 1, 0, 3, 1, 0, 3, 3])  # image 2 has none, unsorted
    got = pool_segments(tokens, weights, image_index, first=1)
    ref = torch.stack([weights[k] @ tokens[image_index[k], 1:] for k in range(s)])
    torch.testing.assert_close(got, ref)
    assert torch.all(got[4] == 0)
    upstream = torch.randn(s, d, generator=gen)
    (grad,) = torch.autograd.grad((got * upstream).sum(), tokens)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), tokens)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.all(grad[2] == 0) and torch.all(grad[:, 0] == 0)  # no segment in image 2; cls untouched
    patches = tokens.detach()[:, 1:].contiguous()
    torch.testing.assert_close(pool_segments(patches, weights, image_index), ref.detach())  # first=0
    assert pool_segments(tokens, weights[:0], image_index[:0], first=1).shape == (0, d)
    with pytest.raises(ValueError, match="do not fit"):
        pool_segments(patches, weights, image_index, first=1)


def test_pooling_with_area_weights_of_real_masks() -> None:
    """End to end on masks: pooled features equal the loop over segments and patches."""
    masks = _random_masks(torch.Generator().manual_seed(5), 6, 29, 35)
    weights = area_weights(masks, 5)
    feats = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 25, 3)).astype(np.float32))
    idx = torch.tensor([0, 1, 1, 0, 1, 0])
    ref = torch.zeros(6, 3)
    for k in range(6):
        for q in range(25):
            ref[k] += weights[k, q] * feats[idx[k], q]
    torch.testing.assert_close(pool_segments(feats, weights, idx), ref)
