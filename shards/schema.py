"""The typed model of one shard sample (schema version 1), shared by writer, reader and validator.

The format is documented for humans in ``shards/SCHEMA.md``; this module is its executable form.
``from_dict`` validates by hand with messages that name the offending field (the reference: the
validator and the writer use it, and the reader's faster parse, ``shards/sample_json.py``, falls
back to it for every message), and nothing here ever evaluates or unpickles anything.

Shards come from other people, so ``from_dict`` treats the JSON as untrusted: every string must
encode as UTF-8 (JSON can carry lone surrogates that crash a tokenizer later), keys are at most
``MAX_KEY_CHARS`` long (they become file names), every RLE's counts must cover exactly the image
(a short RLE crashes ``inspect`` and makes pycocotools read uninitialised memory), and
:class:`SampleLimits` caps the claimed image size, the segments per sample and each RLE string
before any of them is parsed.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .rle import CountsError, counts_cover

SCHEMA_VERSION = 1

#: Image extensions a sample may carry (the original bytes, never re-encoded).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Every member extension a shard may hold. Anything else (``.pickle``, ``.pyd``, ``.pth``...) is rejected.
ALLOWED_EXTENSIONS = (*IMAGE_EXTENSIONS, "json", "txt", "npy")

#: Longest key accepted: keys become member and file names (most file systems allow 255 bytes).
MAX_KEY_CHARS = 128

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


class SchemaError(ValueError):
    """A sample's JSON does not follow the schema; the message names the field."""


def make_key(source: str, image_id: str | int) -> str:
    """A deterministic webdataset key for an image: ``{source}_{image_id}`` without dots.

    webdataset splits member names at the first dot, so keys must not contain any. Characters
    outside ``[A-Za-z0-9_-]`` are replaced, and when that changed anything a short hash of the
    original id is appended so that two ids never collide after sanitising.
    """
    raw = f"{source}_{image_id}"
    clean = _KEY_BAD.sub("-", raw)
    if clean != raw:
        clean = f"{clean}_{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return clean


def is_valid_key(key: str) -> bool:
    """``[A-Za-z0-9_-]+`` and at most :data:`MAX_KEY_CHARS` long."""
    return len(key) <= MAX_KEY_CHARS and bool(_KEY_RE.fullmatch(key))  # match's ``$`` lets a trailing newline in


@dataclass(frozen=True)
class SampleLimits:
    """Caps on what one sample's JSON may claim, checked before the claim is acted on (a 10 KB JSON
    claiming 40000x40000 pixels or a million segments would otherwise cost gigabytes or minutes)."""

    max_pixels: int = 16384 * 16384  #: width x height (the decoder's default decompression-bomb limit)
    max_segments: int = 10_000  #: segments per sample (SAM's automatic masks give a few hundred)
    max_counts_chars: int = 1 << 22  #: characters of one RLE ``counts`` string
    max_json_bytes: int = 64 << 20  #: bytes of a sample's ``.json`` member
    max_member_bytes: int = 1 << 28  #: bytes of any member (an image may be up to ``read.max_bytes``)


DEFAULT_LIMITS = SampleLimits()


@dataclass
class Text:
    """One description of a segment, with where it came from (``coco``, ``vg``, ``llava``...)."""

    text: str
    source: str
    score: float = 1.0


@dataclass
class Caption:
    """An image-level caption and its source (``coco``, ``llava:scene``...)."""

    text: str
    source: str


@dataclass
class Segment:
    """One segment: a COCO RLE mask (``counts`` as str), its box ``[x, y, w, h]``, area and texts."""

    id: int
    rle: dict[str, Any]
    bbox: list[float]
    area: int
    texts: list[Text]
    score: float = 1.0


@dataclass
class SampleMeta:
    """The ``.json`` member of a sample."""

    key: str
    image_id: str
    source: str
    width: int
    height: int
    image_ext: str = "jpg"
    file_name: str = ""
    captions: list[Caption] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, limits: SampleLimits = DEFAULT_LIMITS) -> SampleMeta:
        """Parse and validate a decoded JSON object; raises :class:`SchemaError` naming the field."""
        _expect(isinstance(d, dict), "sample JSON must be an object")
        version = d.get("schema_version")
        _expect(version == SCHEMA_VERSION, f"schema_version is {version!r}, expected {SCHEMA_VERSION}")
        for name, typ in (("key", str), ("image_id", str), ("source", str), ("width", int), ("height", int)):
            _expect(name in d, f"missing field {name!r}")
            _expect(isinstance(d[name], typ) and not isinstance(d[name], bool), f"{name!r} must be {typ.__name__}")
            if typ is str:
                _utf8(d[name], name)
        _expect(len(d["key"]) <= MAX_KEY_CHARS, f"key is {len(d['key'])} characters, more than {MAX_KEY_CHARS}")
        _expect(is_valid_key(d["key"]), f"key {d['key']!r} must match [A-Za-z0-9_-]+ (no dots)")
        _expect(d["width"] > 0 and d["height"] > 0, "width and height must be positive")
        pixels = d["width"] * d["height"]
        _expect(pixels <= limits.max_pixels, f"width x height = {d['width']}x{d['height']} = {pixels} pixels, "
                                             f"more than the limit of {limits.max_pixels}")
        image_ext = d.get("image_ext", "jpg")
        _expect(image_ext in IMAGE_EXTENSIONS, f"image_ext {image_ext!r} not one of {IMAGE_EXTENSIONS}")
        captions = []
        for i, c in enumerate(_list(d, "captions")):
            _expect(isinstance(c, dict), f"captions[{i}] must be an object")
            captions.append(Caption(text=_str(c, "text", f"captions[{i}]"), source=_str(c, "source", f"captions[{i}]")))
        raw_segments = _list(d, "segments")
        _expect(len(raw_segments) <= limits.max_segments,
                f"{len(raw_segments)} segments, more than the limit of {limits.max_segments}")
        segments = [_segment(s, i, d["height"], d["width"], limits) for i, s in enumerate(raw_segments)]
        _check_coverage(segments, d["height"], d["width"])
        return cls(
            key=d["key"], image_id=d["image_id"], source=d["source"], width=d["width"], height=d["height"],
            image_ext=image_ext, file_name=_utf8(str(d.get("file_name", "")), "file_name"), captions=captions,
            segments=segments,
        )


def _segment(s: Any, i: int, h: int, w: int, limits: SampleLimits) -> Segment:
    where = f"segments[{i}]"
    _expect(isinstance(s, dict), f"{where} must be an object")
    for name in ("id", "rle", "bbox", "area", "texts"):
        _expect(name in s, f"{where} missing field {name!r}")
    _expect(isinstance(s["id"], int) and not isinstance(s["id"], bool), f"{where}.id must be an integer")
    rle = s["rle"]
    _expect(isinstance(rle, dict) and "size" in rle and "counts" in rle, f"{where}.rle must have size and counts")
    _expect(isinstance(rle["counts"], str), f"{where}.rle.counts must be a compressed RLE string")
    size = rle["size"]
    _expect(isinstance(size, list) and len(size) == 2, f"{where}.rle.size must be [h, w]")
    _expect(list(size) == [h, w], f"{where}.rle.size {size} differs from the image size [{h}, {w}]")
    counts = rle["counts"]
    _expect(len(counts) <= limits.max_counts_chars,
            f"{where}.rle.counts is {len(counts)} characters, more than the limit of {limits.max_counts_chars}")
    bbox = s["bbox"]
    _expect(isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox),
            f"{where}.bbox must be [x, y, w, h]")
    _expect(isinstance(s["area"], int | float) and 0 <= s["area"] < math.inf, f"{where}.area must be a non-negative number")
    texts = []
    for j, t in enumerate(_list(s, "texts", where)):
        tw = f"{where}.texts[{j}]"
        _expect(isinstance(t, dict), f"{tw} must be an object")
        text = _str(t, "text", tw)
        _expect(text.strip() != "", f"{tw}.text is empty")
        score = t.get("score", 1.0)
        _expect(isinstance(score, int | float), f"{tw}.score must be a number")
        texts.append(Text(text=text, source=_str(t, "source", tw), score=float(score)))
    _expect(len(texts) > 0, f"{where} has no texts")
    score = s.get("score", 1.0)
    _expect(isinstance(score, int | float), f"{where}.score must be a number")
    return Segment(id=int(s["id"]), rle={"size": [int(size[0]), int(size[1])], "counts": rle["counts"]},
                   bbox=[float(v) for v in bbox], area=int(s["area"]), texts=texts, score=float(score))


def _check_coverage(segments: list[Segment], h: int, w: int) -> None:
    """Every segment's counts parse strictly and cover exactly ``h x w`` pixels: one batched parse of
    all the sample's strings (:func:`shards.rle.counts_cover`), after their lengths were capped."""
    try:
        covered = counts_cover([s.rle["counts"] for s in segments])
    except CountsError as e:
        raise SchemaError(f"segments[{e.index}].rle.counts is malformed: {e}") from None
    wrong = np.flatnonzero(covered != h * w)
    if wrong.size:
        i = int(wrong[0])
        raise SchemaError(f"segments[{i}].rle.counts cover {int(covered[i])} pixels, the image has {h * w} ({h}x{w})")


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise SchemaError(message)


def _list(d: dict, name: str, where: str = "") -> list:
    value = d.get(name, [])
    _expect(isinstance(value, list), f"{where + '.' if where else ''}{name} must be a list")
    return value


def _str(d: dict, name: str, where: str) -> str:
    _expect(isinstance(d.get(name), str), f"{where}.{name} must be a string")
    return _utf8(d[name], f"{where}.{name}")


def _utf8(value: str, where: str) -> str:
    """``value`` unchanged if it encodes as UTF-8 (JSON's ``\\ud800`` escapes make lone surrogates that do not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SchemaError(f"{where} is not valid Unicode text ({e.reason} at character {e.start})") from None
    return value
