"""Validation of annotation files, streamed, so that a malformed file stops the job at start.

pydantic models of the parts of the COCO and Visual Genome formats the sources use (extra keys are
allowed: real files carry ``info``, ``licenses``, ``coco_url``...). Errors are reported with the
file and the JSON path of the first offending values, e.g.
``instances.json: annotations[12].segmentation: Input should be a valid list``.

Files are read with ``ijson`` (the yajl C backend), one array element at a time, so that planning a
job holds one annotation at a time rather than the whole document as Python objects (``json.load``
of a 200 MB file takes ~3 GiB). Before that, :func:`check_depth` refuses documents nested deeper
than any annotation format needs: ijson builds a prefix string per nesting level, so a file of a few
hundred kilobytes of ``[`` would otherwise take gigabytes, and the stdlib parser raises
``RecursionError``.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import ijson
import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from shards import storage

from .base import SourceError

M = TypeVar("M", bound=BaseModel)

#: Deepest nesting of arrays and objects accepted in an annotation file (COCO polygons are 4 deep).
MAX_JSON_DEPTH = 32
_CHUNK = 1 << 20
_BRACKET = np.zeros(256, dtype=np.int8)  # byte -> +1 opens, -1 closes an array or object
_BRACKET[[0x5B, 0x7B]] = 1
_BRACKET[[0x5D, 0x7D]] = -1


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class CocoImage(_Loose):
    id: int | str
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class CocoCategory(_Loose):
    id: int
    name: str


class CocoRle(_Loose):
    counts: list[int] | str
    size: list[int] = Field(min_length=2, max_length=2)


class CocoAnnotation(_Loose):
    image_id: int | str
    category_id: int
    segmentation: list[list[float]] | CocoRle
    iscrowd: int = 0


class CocoCaption(_Loose):
    image_id: int | str
    caption: str


class VgImage(_Loose):
    image_id: int | str = Field(validation_alias=AliasChoices("image_id", "id"))
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    url: str = ""


class VgRegion(_Loose):
    phrase: str
    x: float
    y: float
    width: float
    height: float


class VgImageRegions(_Loose):
    image_id: int | str = Field(validation_alias=AliasChoices("id", "image_id"))
    regions: list[VgRegion]


def json_file(path: str | Path, what: str) -> Path:
    """The annotation file as a checked path: it exists, is a regular file, and is not nested too deeply."""
    if not str(path):
        raise SourceError(f"no {what} file given")
    p = _fetch(str(path), what) if storage.is_remote(path) else Path(path)
    if not p.is_file():
        raise SourceError(f"{what} file {p} not found")
    depth = check_depth(p)
    if depth > MAX_JSON_DEPTH:
        raise SourceError(f"{p}: not a {what} file: JSON nested more than {MAX_JSON_DEPTH} levels deep "
                          f"(annotation files need 4)")
    return p


def _fetch(url: str, what: str) -> Path:
    """A local copy of an annotation file on object storage (streamed parsing and ``mmap`` need a file)."""
    try:
        return storage.local_copy(url)
    except FileNotFoundError:
        raise SourceError(f"{what} file {url} not found") from None
    except Exception as e:  # permissions, credentials, network: one line naming the file
        raise SourceError(f"{what} file {url} cannot be read ({type(e).__name__}: {e})") from None


def check_depth(path: Path, limit: int = MAX_JSON_DEPTH, chunk: int = _CHUNK) -> int:
    """The deepest nesting of ``[``/``{`` outside strings, stopping early once past ``limit``.

    Vectorised over 1 MiB chunks with numpy (no JSON library reports depth without building
    the document): a quote preceded by an odd run of backslashes is escaped, a bracket is inside a
    string when an odd number of unescaped quotes precede it, and the running sum of opening minus
    closing brackets outside strings is the depth. Only brackets and quotes are gathered, so a chunk
    costs a few passes over its bytes (planning runs in the job's driver, where every pass over the
    annotation bytes counts); the backslash runs are measured only in chunks that hold a backslash.
    Carried between chunks: depth, string parity, trailing backslashes.
    """
    depth, in_string, trailing_bs, deepest = 0, 0, 0, 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            b = np.frombuffer(data, dtype=np.uint8)
            quote = np.flatnonzero(b == 0x22)
            if quote.size and (trailing_bs or b"\\" in data):
                # index of the last non-backslash at or before each position (-1: none in this chunk)
                last_nb = np.maximum.accumulate(np.where(b == 0x5C, -1, np.arange(b.size)))
                prev = quote - 1
                lnb = np.where(prev >= 0, last_nb[np.maximum(prev, 0)], -1)
                run = np.where(lnb >= 0, prev - lnb, quote + trailing_bs)  # backslashes just before each quote
                quote = quote[run % 2 == 0]
            brackets = np.flatnonzero(_BRACKET[b])
            if brackets.size:
                delta = _BRACKET[b[brackets]]
                delta[(np.searchsorted(quote, brackets) + in_string) % 2 == 1] = 0  # inside a string
                levels = depth + np.cumsum(delta, dtype=np.int64)
                deepest = max(deepest, int(levels.max()))
                if deepest > limit:
                    return deepest
                depth = int(levels[-1])
            in_string = (in_string + quote.size) % 2
            kept = len(data.rstrip(b"\\"))
            trailing_bs = len(data) - kept if kept else len(data) + trailing_bs
    return deepest


def stream(path: Path, prefix: str) -> Iterator[Any]:
    """The elements of the array at ``prefix`` (ijson syntax: ``annotations.item``, ``item``), one at a time.

    Numbers come as ``float`` (yajl's fast path). A number too large for a double (``1e999``, valid
    JSON) makes yajl stop; the pass then restarts with exact ``Decimal`` numbers, skipping what was
    already yielded, and such numbers reach the per-image checks as ``inf``. ``NaN``/``Infinity``
    tokens are not JSON: like any syntax error they are a :class:`SourceError` naming the file.
    """
    done = 0
    for use_float in (True, False):
        try:
            with open(path, "rb") as f:
                for i, element in enumerate(ijson.items(f, prefix, use_float=use_float)):
                    if i >= done:
                        done += 1
                        yield element
            return
        except ijson.JSONError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if use_float and "overflow" in first:
                continue
            raise SourceError(f"{path}: not valid JSON ({first}; NaN and Infinity are not JSON numbers)") from e
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not valid JSON (not UTF-8: {e.reason})") from e


def has_key(path: Path, key: str) -> bool:
    """Whether the document names ``key`` as an object key anywhere (a regex over the mapped file).

    Used only to tell "no ``annotations`` key" (a malformed file) from an empty array, which a
    stream cannot: a key of that name inside some nested object would only make a missing top-level
    key read as an empty list.
    """
    if path.stat().st_size == 0:
        return False
    pattern = re.compile(rb'"' + re.escape(key.encode()) + rb'"\s*:')
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return pattern.search(mm) is not None


def elements(path: Path, key: str, model: type[M], file_model: str) -> Iterator[tuple[int, M]]:
    """``(index, validated element)`` of the top-level array ``key`` (``""``: the document is the array).

    An absent key is an error (an empty array is not), told apart only once the stream is empty.
    """
    n = -1
    for n, raw in enumerate(stream(path, f"{key}.item" if key else "item")):
        yield n, validate(raw, model, path, f"{key}[{n}]")
    if n < 0 and key and not has_key(path, key):
        raise SourceError(f"{path}: malformed {file_model} file: {key}: Field required")
    if n < 0 and not key:
        with open(path, "rb") as f:
            first = f.read(4096).lstrip()[:1]
        if first != b"[":
            raise SourceError(f"{path}: expected a JSON list of {model.__name__} objects")


def validate(data: Any, model: type[M], path: str | Path, where: str = "") -> M:
    """One element validated; the error names the file and the element's JSON path (``where``)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SourceError(f"{path}: malformed {model.__name__}: {_errors(e, where)}") from e


def _errors(e: ValidationError, where: str = "", limit: int = 3) -> str:
    parts = []
    for err in e.errors()[:limit]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        parts.append(f"{(where + loc).lstrip('.') or '(top level)'}: {err['msg']}")
    more = e.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
