"""The reader's parse of ``KEY.json`` members: :meth:`SampleMeta.from_dict`'s result and errors, fast.

``from_dict`` (``shards/schema.py``) is the reference: it checks a decoded JSON object field by
field in Python and writes every error message. Reading shards, that Python walk and the per-segment
RLE parse cost ten times what ``tarfile`` needs to read the bytes, so here:

- pydantic-core parses, type-checks and builds the dataclasses in one pass in Rust
  (:data:`_SAMPLE_JSON`, strict: no bool for an int, no number in a string; its parser refuses
  invalid UTF-8 and lone surrogates);
- the cross-field checks (limits, ``rle.size == [height, width]``, non-empty texts) run on the result;
- the RLE coverage of every segment of a whole batch of samples is one :func:`shards.rle.counts_cover`
  call (numpy's per-call overhead, not the characters, dominated one sample's handful of strings).

Whenever any of that fails for a sample, its JSON goes through ``json.loads`` + ``from_dict``: a
refused sample gets exactly the reference's message, and an input the fast path is merely stricter
about (a bool in a bbox, a float in ``rle.size``) is still accepted exactly as ``from_dict`` accepts
it. ``tests/test_shards_untrusted_json.py`` checks that the two paths agree on many broken samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic_core import SchemaValidator, ValidationError, core_schema

from .rle import CountsError, counts_cover
from .schema import (
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    MAX_KEY_CHARS,
    SCHEMA_VERSION,
    Caption,
    SampleLimits,
    SampleMeta,
    Segment,
    Text,
)


def _dataclass(cls: type, fields: dict[str, core_schema.CoreSchema]) -> core_schema.CoreSchema:
    """A pydantic-core schema that builds ``cls`` (one of the schema's own dataclasses) in Rust."""
    args = [core_schema.dataclass_field(name, schema) for name, schema in fields.items()]
    return core_schema.dataclass_schema(cls, core_schema.dataclass_args_schema(cls.__name__, args), list(fields))


def _default(schema: core_schema.CoreSchema, value: Any) -> core_schema.CoreSchema:
    if isinstance(value, list):  # a fresh list per sample, never one shared default
        return core_schema.with_default_schema(schema, default_factory=list)
    return core_schema.with_default_schema(schema, default=value)


def _sample_schema() -> core_schema.CoreSchema:
    """``KEY.json`` as pydantic-core types, strict (no bool for an int, no number in a string), for
    every check of ``from_dict`` that needs no other field, the limits or ``str.strip``; it builds
    the dataclasses directly (a TypedDict schema plus Python constructors cost a third more)."""
    text, number = core_schema.str_schema(strict=True), core_schema.float_schema(strict=True)
    integer = core_schema.int_schema(strict=True)
    rle = core_schema.typed_dict_schema({"size": core_schema.typed_dict_field(core_schema.list_schema(integer)),
                                         "counts": core_schema.typed_dict_field(text)})
    area = core_schema.union_schema([  # from_dict keeps int(area) of any finite non-negative number
        core_schema.int_schema(strict=True, ge=0),
        core_schema.no_info_after_validator_function(int, core_schema.float_schema(strict=True, ge=0,
                                                                                  allow_inf_nan=False))])
    text_ = _dataclass(Text, {"text": text, "source": text, "score": _default(number, 1.0)})
    caption = _dataclass(Caption, {"text": text, "source": text})
    segment = _dataclass(Segment, {
        "id": integer, "rle": rle, "bbox": core_schema.list_schema(number, min_length=4, max_length=4),
        "area": area, "texts": core_schema.list_schema(text_, min_length=1), "score": _default(number, 1.0)})
    return _dataclass(SampleMeta, {
        "key": core_schema.str_schema(strict=True, max_length=MAX_KEY_CHARS, pattern=r"^[A-Za-z0-9_-]+$"),
        "image_id": text, "source": text,
        "width": core_schema.int_schema(strict=True, gt=0), "height": core_schema.int_schema(strict=True, gt=0),
        "image_ext": _default(core_schema.literal_schema(list(IMAGE_EXTENSIONS)), "jpg"),
        "file_name": _default(text, ""),
        "captions": _default(core_schema.list_schema(caption), []),
        "segments": _default(core_schema.list_schema(segment), []),
        "schema_version": core_schema.literal_schema([SCHEMA_VERSION]),  # required, unlike the dataclass field
    })


#: The first step of the fast path: JSON bytes to :class:`SampleMeta`, parsed and typed in Rust.
_SAMPLE_JSON = SchemaValidator(_sample_schema())


def parse_sample_json(data: bytes | str, limits: SampleLimits = DEFAULT_LIMITS) -> SampleMeta:
    """``SampleMeta.from_dict(json.loads(data), limits)``, same result and same errors, faster."""
    out = parse_sample_jsons([data], limits)[0]
    if isinstance(out, Exception):
        raise out
    return out


def parse_sample_jsons(datas: Sequence[bytes | str], limits: SampleLimits = DEFAULT_LIMITS,
                       ) -> list[SampleMeta | Exception]:
    """:func:`parse_sample_json` of each, with one RLE coverage check for all of them.

    A refused sample's entry is the exception ``from_dict`` (or ``json.loads``) raised for it, so
    that the caller reports it in order and the others go on.
    """
    checked = [_checked(data, limits) for data in datas]
    ok = [i for i, d in enumerate(checked) if d is not None]
    covered_ok = _covered(checked, ok)
    for i, good in zip(ok, covered_ok, strict=True):
        if not good:
            checked[i] = None
    return [m if m is not None else _reference(data, limits) for m, data in zip(checked, datas, strict=True)]


def _checked(data: bytes | str, limits: SampleLimits) -> SampleMeta | None:
    """The sample if it passes every check of ``from_dict`` but the RLE coverage, else ``None``."""
    try:
        meta = _SAMPLE_JSON.validate_json(data)
    except ValidationError:
        return None
    h, w = meta.height, meta.width
    if h * w > limits.max_pixels or len(meta.segments) > limits.max_segments:
        return None
    size, max_chars = [h, w], limits.max_counts_chars
    for s in meta.segments:
        if s.rle["size"] != size or len(s.rle["counts"]) > max_chars or not all(t.text.strip() for t in s.texts):
            return None
    return meta


def _covered(checked: list[SampleMeta | None], ok: list[int]) -> list[bool]:
    """Whether every RLE of each sample ``checked[i]``, ``i`` in ``ok``, parses and covers its image."""
    counts = [s.rle["counts"] for i in ok for s in checked[i].segments]
    pixels = [checked[i].height * checked[i].width for i in ok]
    per = [len(checked[i].segments) for i in ok]
    try:
        covered = counts_cover(counts)
    except CountsError:  # one malformed string somewhere: find its sample one sample at a time
        return [_covered(checked, [i])[0] for i in ok] if len(ok) > 1 else [False]
    bad = covered != np.repeat(np.asarray(pixels, dtype=np.int64), per)
    bad_before = np.zeros(bad.size + 1, dtype=np.intp)  # a sample passes if none of its segments is bad
    np.cumsum(bad, out=bad_before[1:])
    edges = np.zeros(len(ok) + 1, dtype=np.intp)
    np.cumsum(per, out=edges[1:])
    return (bad_before[edges[1:]] == bad_before[edges[:-1]]).tolist()


def _reference(data: bytes | str, limits: SampleLimits) -> SampleMeta | Exception:
    """``from_dict(json.loads(data))``: the refused sample's error, or the sample if only the fast path refused it."""
    try:
        return SampleMeta.from_dict(json.loads(data), limits)
    except Exception as e:  # SchemaError, JSONDecodeError, UnicodeDecodeError, RecursionError: any is a bad sample
        return e
