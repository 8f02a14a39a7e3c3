"""Per-pixel vote: every pixel sums the class probabilities of the masks covering it, then argmax.

``score[p] = sum_{s: p in mask_s} probs[s]`` and ``label[p] = argmax_k score[p, k]``. Done naively
this is ``K x H x W`` floats and a pass per mask. Pixels covered by the same set of masks get the
same score, and an image has few distinct sets (hundreds) against ~10^5-10^6 pixels, so the sets
are found once: each pixel's coverage bits are packed into 64-bit words, the
distinct words are grouped in one hash pass (see :func:`coverage_sets`), the scores of the distinct sets are one
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
import pandas as pd
from scipy import ndimage

UNCOVERED_RULES = ("nearest", "image")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on uint64 (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _pack_mask_bits(flat: np.ndarray) -> np.ndarray:
    """``[S, N]`` bool -> ``[ceil(S/8), N]`` uint8, bit ``b`` of byte ``k`` = row ``8k + b`` (``np.packbits``
    along axis 0 with ``bitorder="little"``, which walks the strided axis and is 4-6x slower here)."""
    rows = flat.view(np.uint8)
    out = np.zeros((-(-flat.shape[0] // 8), flat.shape[1]), np.uint8)
    for b in range(8):
        part = rows[b::8]
        out[: len(part)] |= part << np.uint8(b)
    return out


def _group_rows_exact(words: np.ndarray) -> np.ndarray:
    """Group ids of the rows of ``[N, W]`` uint64, exactly: column codes combined pairwise and re-factorised."""
    codes, _ = pd.factorize(words[:, 0])
    for j in range(1, words.shape[1]):
        col, uniq = pd.factorize(words[:, j])
        codes, _ = pd.factorize(codes.astype(np.int64) * len(uniq) + col)
    return codes


def coverage_sets(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct coverage sets of ``[S, H, W]`` bool masks: ``([U, S] bool, [H*W] int64 index into U)``.

    Each pixel's ``S`` coverage bits become ``ceil(S / 64)`` uint64 words. With one word the word is
    the key; with several they are hashed into one key (splitmix64 mixing). Keys are grouped with
    ``pandas.factorize`` (a hash table, linear time; ``np.unique`` sorts, several times slower on
    10^5-10^6 pixels). With several words the grouping is checked against the words themselves and
    redone exactly (:func:`_group_rows_exact`) on a hash collision, so the sets are always exact.
    """
    s = masks.shape[0]
    packed = _pack_mask_bits(masks.reshape(s, -1))                       # [ceil(S/8), HW]
    n_words = -(-packed.shape[0] // 8)
    words = np.zeros((packed.shape[1], n_words * 8), np.uint8)
    words[:, : packed.shape[0]] = packed.T
    words = words.view(np.uint64)                                          # [HW, n_words]
    key = words[:, 0].copy()
    for j in range(1, n_words):
        key = _mix64(key) ^ words[:, j]
    inverse, _ = pd.factorize(key)
    if n_words > 1 and not np.array_equal(words[_first_of_each(inverse)][inverse], words):  # a hash collision
        inverse = _group_rows_exact(words)
    uniq = words[_first_of_each(inverse)]
    bits = np.unpackbits(np.ascontiguousarray(uniq).view(np.uint8), axis=1, bitorder="little", count=s)
    return bits.astype(bool), np.asarray(inverse, dtype=np.int64)


def _first_of_each(codes: np.ndarray) -> np.ndarray:
    """Index of the first row of each group ``0..max(codes)`` (codes from ``pd.factorize``: first-seen order)."""
    first = np.empty(int(codes.max()) + 1, np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)
    return first


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
