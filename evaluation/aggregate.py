"""Per-pixel vote: every pixel sums the class probabilities of the masks covering it, then argmax.

``score[p] = sum_{s: p in mask_s} probs[s]`` and ``label[p] = argmax_k score[p, k]``. Done naively
this is ``K x H x W`` floats and a pass per mask. Pixels covered by the same set of masks get the
same score, and an image has few distinct sets (hundreds) against ~10^5-10^6 pixels, so the sets
are found once: each pixel's coverage bits are packed into 64-bit words (``np.packbits``), the
distinct words are found with one ``np.unique`` (see :func:`coverage_sets`), the scores of the distinct sets are one
``[U, S] @ [S, K]`` matmul, and every pixel takes its set's label. The result is exactly the naive
vote (ties go to the lower class index, as ``argmax`` does). numpy/scipy have no such routine,
hence this module.

Pixels no mask covers (SAM proposals rarely tile the whole image), by ``uncovered``:

- ``nearest`` (default): the label of the nearest covered pixel (Euclidean,
  ``scipy.ndimage.distance_transform_edt``), i.e. the masks are grown into the gaps; an image with no
  mask at all falls back to ``image``;
- ``image``: the class of the whole image embedded as one more mask (``image_probs``), a
  "background" mask that fills only the uncovered pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

UNCOVERED_RULES = ("nearest", "image")


def coverage_sets(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct coverage sets of ``[S, H, W]`` bool masks: ``([U, S] bool, [H*W] int64 index into U)``.

    Each pixel's ``S`` coverage bits become ``ceil(S / 64)`` uint64 words; with one word the words
    are the keys, with several they are hashed into one key (multiply-xor) and the grouping is then
    checked against the words themselves, falling back to a row-wise ``np.unique`` on a collision,
    so the sets are always exact.
    """
    s = masks.shape[0]
    per_pixel = np.ascontiguousarray(masks.reshape(s, -1).T)               # [HW, S]
    packed = np.packbits(per_pixel, axis=1, bitorder="little")            # [HW, ceil(S/8)]
    n_words = -(-packed.shape[1] // 8)
    if packed.shape[1] != n_words * 8:
        packed = np.pad(packed, ((0, 0), (0, n_words * 8 - packed.shape[1])))
    words = packed.view(np.uint64)                                        # [HW, n_words]
    key = words[:, 0].copy()
    for j in range(1, n_words):
        key *= np.uint64(0x9E3779B97F4A7C15)
        key ^= words[:, j]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    uniq = words[first]
    if n_words > 1 and not np.array_equal(uniq[inverse], words):          # a hash collision: exact path
        uniq, inverse = np.unique(words, axis=0, return_inverse=True)
    bits = np.unpackbits(np.ascontiguousarray(uniq).view(np.uint8), axis=1, bitorder="little", count=s)
    return bits.astype(bool), inverse.reshape(-1)


def aggregate(masks: np.ndarray, probs: np.ndarray, uncovered: str = "nearest",
              image_probs: np.ndarray | None = None) -> np.ndarray:
    """``int32 [H, W]`` labels from ``[S, H, W]`` bool masks and their ``[S, K]`` class probabilities."""
    if uncovered not in UNCOVERED_RULES:
        raise ValueError(f"uncovered must be one of {UNCOVERED_RULES}, got {uncovered!r}")
    masks = np.asarray(masks, dtype=bool)
    probs = np.asarray(probs, dtype=np.float32)
    if masks.ndim != 3 or probs.ndim != 2 or masks.shape[0] != probs.shape[0]:
        raise ValueError(f"masks [S, H, W] and probs [S, K] must agree, got {masks.shape} and {probs.shape}")
    h, w = masks.shape[1:]
    fallback = int(np.argmax(image_probs)) if image_probs is not None else 0
    if masks.shape[0] == 0:
        return np.full((h, w), fallback, np.int32)
    sets, index = coverage_sets(masks)
    set_labels = np.argmax(sets.astype(np.float32) @ probs, axis=1).astype(np.int32)
    empty = ~sets.any(axis=1)
    labels = set_labels[index].reshape(h, w)
    if not empty.any():
        return labels
    hole = empty[index].reshape(h, w)
    if uncovered == "image" or hole.all():
        if uncovered == "nearest" and image_probs is None:
            raise ValueError("no pixel is covered: the 'nearest' rule needs image_probs to fall back on")
        labels[hole] = fallback
        return labels
    nearest = ndimage.distance_transform_edt(hole, return_distances=False, return_indices=True)
    return labels[nearest[0], nearest[1]]
