"""shards.rle refuses malformed RLEs instead of letting pycocotools decode uninitialised memory."""

from __future__ import annotations

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
