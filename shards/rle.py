"""COCO RLE helpers on pycocotools, safe for any number of masks.

Masks stay RLE (``{"size": [h, w], "counts": str}``) from the segmenter to the trainer's data
workers; pixels are materialised only where they are needed. pycocotools does the work; these
wrappers only fix its sharp edges: ``counts`` as ``str`` (JSON-able) rather than ``bytes``, Fortran
order on encode, and ``mask.area``/``toBbox`` overflowing on lists of more than 255 RLEs (chunked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]
_CHUNK = 255  # pycocotools' area/toBbox raise OverflowError on longer lists
_MAX_RLE_DIGITS = 7  # 35 bits per count: far above any image's pixel count


def _to_coco(rles: Sequence[RLE]) -> list[dict]:
    return [{"size": list(r["size"]), "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]}
            for r in rles]


def _to_json(rle: dict) -> RLE:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode(masks: np.ndarray) -> list[RLE]:
    """Encode boolean masks ``(N, H, W)`` (or one ``(H, W)``) to JSON-able RLEs."""
    masks = np.asarray(masks)
    single = masks.ndim == 2
    if single:
        masks = masks[None]
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    out = [_to_json(r) for r in mask_utils.encode(fortran)]
    return out


def encode_one(mask: np.ndarray) -> RLE:
    return encode(np.asarray(mask)[None])[0]


def decode(rles: Sequence[RLE] | RLE) -> np.ndarray:
    """Decode RLEs to a boolean array ``(N, H, W)``; a single RLE dict gives ``(H, W)``.

    Each RLE is checked first (:func:`check`): pycocotools decodes counts that cover fewer pixels
    than ``size`` into uninitialised memory instead of failing, so a corrupt shard would otherwise
    train on garbage masks.
    """
    if isinstance(rles, dict):
        check(rles)
        return mask_utils.decode(_to_coco([rles])[0]).astype(bool)
    if len(rles) == 0:
        return np.zeros((0, 0, 0), dtype=bool)
    check_all(rles)
    return mask_utils.decode(_to_coco(rles)).transpose(2, 0, 1).astype(bool)


def check(rle: RLE) -> None:
    """Raise ``ValueError`` unless ``rle`` is a well-formed compressed RLE covering exactly ``size``."""
    h, w = (int(v) for v in rle["size"])
    total = int(rle_counts(_counts_str(rle["counts"])).sum())
    if total != h * w:
        raise ValueError(f"RLE counts cover {total} pixels, its size {h}x{w} has {h * w}")


def check_all(rles: Sequence[RLE]) -> None:
    """:func:`check` of every RLE, with one batched parse (:func:`counts_cover`) for all of them."""
    covered = counts_cover([_counts_str(r["counts"]) for r in rles])
    for r, total in zip(rles, covered.tolist(), strict=True):
        h, w = (int(v) for v in r["size"])
        if total != h * w:
            raise ValueError(f"RLE counts cover {total} pixels, its size {h}x{w} has {h * w}")


def _counts_str(counts: str | bytes) -> str:
    return counts if isinstance(counts, str) else bytes(counts).decode("ascii", errors="replace")


def rle_counts(counts: str) -> np.ndarray:
    """The run lengths of a COCO compressed RLE string, parsed strictly (``ValueError`` if malformed).

    The inverse of pycocotools' ``rleToString``: 5 bits per character (offset 48), bit 0x20 means
    another character follows, bit 0x10 of the last one is the sign, and runs after the third are
    stored as deltas to the run two before. Vectorised with numpy: one call per segment.
    """
    try:
        c = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError as e:
        raise ValueError("counts has non-ASCII characters") from e
    if c.size == 0:
        raise ValueError("counts is empty")
    if (c < 0).any() or (c > 63).any():
        raise ValueError("counts has characters outside the RLE alphabet ('0'..'o')")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("counts ends in the middle of a number")
    last = np.flatnonzero(~more)  # index of each number's last character
    starts = np.concatenate([[0], last[:-1] + 1])
    lengths = last - starts + 1
    if lengths.max() > _MAX_RLE_DIGITS:
        raise ValueError("counts holds a number too large for any image")
    digit = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * digit), starts)
    negative = (c[last] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * lengths)), x)
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])  # runs[j] = x[j] + runs[j-2] for j > 2
    runs[2::2] = np.cumsum(x[2::2])
    if (runs < 0).any():
        raise ValueError("counts has a negative run length")
    return runs


class CountsError(ValueError):
    """A malformed counts string in a batch; ``index`` says which one (the message is :func:`rle_counts`')."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def counts_cover(counts: Sequence[str]) -> np.ndarray:
    """Pixels each compressed RLE ``counts`` string covers (the sum of its runs), int64, all strings at once.

    The same strict parse as :func:`rle_counts`, done on the strings joined into one buffer, so that
    a batch of segments (one sample's, or a window of samples' in the reader) costs one pass of
    numpy calls instead of one pass per segment: numpy's per-call overhead, not the characters, was
    the reader's main cost, and pycocotools has no call that returns the runs' sum or refuses a
    malformed string. Numbers never straddle two strings because every well-formed string ends on a
    final character. Runs after the third are deltas to the run two before *within their string*:
    consecutive numbers of a string alternate between the two chains, so each chain is a contiguous
    stretch of the even- or odd-indexed numbers of the whole batch, and two cumulative sums minus
    each string's base give every run without sorting. On any malformed string, the strings are
    parsed one by one to raise :class:`CountsError` for the first bad one with :func:`rle_counts`'
    message.
    """
    n = len(counts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        v = np.frombuffer("".join(counts).encode("ascii"), dtype=np.uint8) - np.uint8(48)  # wraps below '0'
    except UnicodeEncodeError:
        _raise_first_bad(counts)
    lens = np.fromiter(map(len, counts), dtype=np.intp, count=n)
    ends = np.cumsum(lens) - 1  # each string's last character
    if not lens.all() or v.max() > 63 or v[ends].max() >= 32:  # empty, outside '0'..'o', ends mid-number
        _raise_first_bad(counts)
    last = np.flatnonzero(v < 32)  # each number's last character
    lengths = np.empty_like(last)
    lengths[0] = last[0] + 1
    np.subtract(last[1:], last[:-1], out=lengths[1:])
    if lengths.max() > _MAX_RLE_DIGITS:
        _raise_first_bad(counts)
    # 5 bits per character, least significant first; bit 0x10 of a number's last character is its
    # sign: v - 32 is the 5-bit digit of a continued character and the signed top digit of a last one
    u = (v - ((v >= 16).view(np.uint8) << 5)).view(np.int8)
    x = u[last].astype(np.int64)  # the top digit: all of a one-character number (three quarters of COCO's)
    longer = np.flatnonzero(lengths > 1)
    for d in range(1, int(lengths.max())):  # Horner's rule for the longer numbers, digit by digit
        if d > 1:
            longer = longer[lengths[longer] > d]
        x[longer] = (x[longer] << 5) + (u[last[longer] - d] & 0x1F)
    first = np.searchsorted(last, ends - lens + 1)  # each string's first number
    x0 = x[first]
    x[first] = 0  # run 0 is no chain's start: runs 1 and 2 are, so the even chain sums from run 2
    runs = np.empty_like(x)
    for parity in (0, 1):  # each chain's runs: the cumulative sum minus its sum before the string
        chain = np.empty(x[parity::2].size + 1, dtype=np.int64)
        chain[0] = 0
        np.cumsum(x[parity::2], out=chain[1:])
        start = (first + 1 - parity) // 2  # the string's first number of this parity, in chain order
        runs[parity::2] = chain[1:] - np.repeat(chain[start], np.diff(start, append=chain.size - 1))
    runs[first] = x0
    if runs.min() < 0:
        _raise_first_bad(counts)
    return np.add.reduceat(runs, first)


def _raise_first_bad(counts: Sequence[str]) -> NoReturn:
    for i, s in enumerate(counts):
        try:
            rle_counts(s)
        except ValueError as e:
            raise CountsError(i, str(e)) from None
    raise AssertionError("counts_cover found a malformed string that rle_counts accepts")  # unreachable



def area(rles: Sequence[RLE]) -> np.ndarray:
    """Pixel areas as int64, chunked around pycocotools' 255-RLE overflow."""
    coco = _to_coco(rles)
    parts = [np.asarray(mask_utils.area(coco[i:i + _CHUNK]), dtype=np.int64) for i in range(0, len(coco), _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def bbox(rles: Sequence[RLE]) -> np.ndarray:
    """Tight boxes ``[x, y, w, h]`` as float64 ``(N, 4)``, chunked like :func:`area`."""
    coco = _to_coco(rles)
    parts = [np.asarray(mask_utils.toBbox(coco[i:i + _CHUNK]), dtype=np.float64).reshape(-1, 4)
             for i in range(0, len(coco), _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.float64)


def iou(a: Sequence[RLE], b: Sequence[RLE]) -> np.ndarray:
    """Mask IoU matrix ``(len(a), len(b))`` computed on the RLEs (no pixels)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    out = mask_utils.iou(_to_coco(a), _to_coco(b), [0] * len(b))
    return np.asarray(out, dtype=np.float64).reshape(len(a), len(b))


def from_polygons(polygons: list[list[float]], height: int, width: int) -> RLE:
    """A COCO polygon list (one object, possibly several parts) to one merged RLE."""
    parts = mask_utils.frPyObjects(polygons, height, width)
    return _to_json(mask_utils.merge(parts))


def from_coco_segmentation(segmentation: Any, height: int, width: int) -> RLE:
    """Any COCO ``segmentation`` (polygons, uncompressed RLE, compressed RLE) to a compressed RLE."""
    if isinstance(segmentation, list):
        return from_polygons(segmentation, height, width)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return _to_json(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str | bytes):
        return _to_json(segmentation)
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
