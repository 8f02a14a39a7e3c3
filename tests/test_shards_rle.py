"""shards.rle refuses malformed RLEs instead of letting pycocotools decode uninitialised memory."""

from __future__ import annotations

import re

import numpy as np
import pytest

from shards import rle


def test_decode_round_trips_random_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 13, 17)) > 0.5
    assert (rle.decode(rle.encode(masks)) == masks).all()
    assert (rle.decode(rle.encode_one(masks[0])) == masks[0]).all()


@pytest.mark.parametrize("counts", ["00000000000", "1", "0", "o", "\u00e9"])
def test_decode_refuses_counts_that_do_not_cover_the_image(counts):
    with pytest.raises(ValueError):
        rle.decode({"size": [2, 2], "counts": counts})
    with pytest.raises(ValueError):
        rle.decode([rle.encode_one(np.ones((2, 2), bool)), {"size": [2, 2], "counts": counts}])


def test_check_names_the_pixel_count():
    good = rle.encode_one(np.ones((3, 4), bool))
    rle.check(good)
    with pytest.raises(ValueError, match="its size 4x4 has 16"):
        rle.check({"size": [4, 4], "counts": good["counts"]})


def _counts_string(runs: list[int]) -> str:
    """Any run lengths (negative ones too) in COCO's compressed string form, as pycocotools' ``rleToString``."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def test_counts_cover_matches_the_one_by_one_parse_and_refuses_negative_runs():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 300, 200)) < rng.uniform(0.01, 0.99, (6, 1, 1))
    counts = [r["counts"] for r in rle.encode(masks)] + [_counts_string([60000])]
    np.testing.assert_array_equal(rle.counts_cover(counts), [rle.rle_counts(c).sum() for c in counts])
    assert (rle.counts_cover(counts) == 60000).all()
    assert _counts_string([5, 3, 2, 7]) == rle.encode_one(np.repeat([0, 1, 0, 1], [5, 3, 2, 7]).reshape(1, 17).T == 1)["counts"]
    sneaky = _counts_string([3, 2, -1, 0, 2, 2])  # covers 8 = 2x4 pixels, but run 2 is negative
    with pytest.raises(ValueError, match="negative run length"):
        rle.rle_counts(sneaky)
    with pytest.raises(rle.CountsError, match="negative run length") as e:
        rle.counts_cover([counts[0], sneaky])
    assert e.value.index == 1
    with pytest.raises(ValueError):
        rle.decode({"size": [2, 4], "counts": sneaky})


def test_counts_cover_agrees_with_rle_counts_on_random_strings():
    """Any string of RLE characters, well-formed or not, between good ones: the batched parse gives the
    one-by-one parse's total or its error, for the right string."""
    rng = np.random.default_rng(1)
    for _ in range(3000):
        s = "".join(chr(48 + v) for v in rng.integers(0, 64, rng.integers(1, 12)))
        try:
            expected = int(rle.rle_counts(s).sum())
        except ValueError as e:
            with pytest.raises(rle.CountsError, match=re.escape(str(e))) as got:
                rle.counts_cover(["0", s, "3"])
            assert got.value.index == 1
        else:
            assert rle.counts_cover(["0", s, "3"]).tolist() == [0, expected, 3]
