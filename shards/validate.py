"""Check every shard in a directory against the format, without trusting anything in it.

A shard comes from a job that may have crashed, a disk that may have filled, or a person who may
have edited it by hand. The validator therefore reads each tar with :mod:`tarfile` in memory
(nothing is ever extracted, nothing is unpickled), and reports each problem with the shard and the
sample key it concerns instead of stopping at the first. It checks what the reader and the trainer
rely on: tar integrity, member names and types, the JSON schema, the image header's size, RLEs that
decode to that size (parsed here before pycocotools sees them: pycocotools decodes a malformed RLE
into uninitialised memory), bbox and area against the mask, non-empty texts, and the stats file.

On object storage (an ``s3://`` / ``gs://`` directory) it checks what readers take there, the
committed shards (tar and stats object), each fetched into a temporary directory and checked like a
local one; a tar object without its stats object (an upload in progress or cut short) is logged,
not read, as every reader skips it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import rle, storage
from .image import SHARD_POLICY, ImageDecodeError
from .image import probe as probe_image
from .schema import (
    ALLOWED_EXTENSIONS,
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    SampleMeta,
    SchemaError,
    is_valid_key,
)
from .writer import file_sha256, list_shards, stats_name, stats_path

log = logging.getLogger(__name__)

NO_KEY = "-"  # the key column of a problem that concerns a whole shard or directory
_BLOCK = tarfile.BLOCKSIZE
MAX_MEMBER_BYTES = DEFAULT_LIMITS.max_member_bytes  # a bigger member is not read into memory (the reader's cap)
_STATS_NAME = re.compile(r"^(?P<stem>.+)\.stats\.json$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: which shard (file name), which sample key, and what."""

    shard: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.message}"


def shard_files(directory: str | Path) -> list[Path]:
    """The tars the validator checks: every ``*.tar`` in the directory, sorted by name (on object
    storage: the committed ones, as URLs)."""
    if storage.is_remote(directory):
        names = storage.listdir(directory)
        return [storage.join(directory, n) for n in storage.committed(names, stats_name)]
    return sorted(Path(directory).glob("*.tar"))


def validate(directory: str | Path) -> list[Problem]:
    """Every problem in every shard of ``directory`` (an empty list means the dataset is sound)."""
    return list(iter_problems(directory))


def iter_problems(directory: str | Path, progress: bool = False) -> Iterator[Problem]:
    """Problems as they are found, directory-level first, then shard by shard (for streaming CLIs)."""
    if storage.is_remote(directory):
        yield from _remote_problems(str(directory), progress)
        return
    directory = Path(directory)
    if not directory.is_dir():
        yield Problem(str(directory), NO_KEY, "not a directory")
        return
    tars = shard_files(directory)
    if not tars:
        yield Problem(directory.name or str(directory), NO_KEY, "no shards (*.tar) in this directory")
    for st in sorted(directory.glob("*.stats.json")):
        if not st.with_name(_STATS_NAME.match(st.name)["stem"] + ".tar").exists():
            yield Problem(st.name, NO_KEY, "stats file without its tar (the shard was deleted or renamed)")
    named = set(list_shards(directory))
    for tar in tars:
        if tar not in named:
            yield Problem(tar.name, NO_KEY, "name does not follow PREFIX-NNNNNN.tar, so readers skip this shard")
    for tmp in sorted(directory.glob(".*.tmp")):
        log.warning("%s is left over from an interrupted job; shards.recover() removes or commits it", tmp.name)
    yield from _check_all(tars, _check_shard, directory.name or str(directory), progress)


def _remote_problems(url: str, progress: bool) -> Iterator[Problem]:
    """:func:`iter_problems` on object storage: one listing, then each committed shard fetched and checked."""
    names = storage.listdir(url)
    tars = storage.committed(names, stats_name)
    label = storage.basename(url) or url
    if not tars:
        yield Problem(label, NO_KEY, "no committed shards (a *.tar with its *.stats.json) under this prefix")
    for name in sorted(names):
        m = _STATS_NAME.match(name)
        if m and m["stem"] + ".tar" not in names:
            yield Problem(name, NO_KEY, "stats file without its tar (the shard was deleted or renamed)")
        elif name.endswith(".tar") and name not in tars:
            log.warning("%s has no stats object: not committed (an upload in progress or cut short); readers "
                        "skip it and the next run of the job removes it", name)
    named = {storage.basename(t) for t in list_shards(url)}
    for name in tars:
        if name not in named:
            yield Problem(name, NO_KEY, "name does not follow PREFIX-NNNNNN.tar, so readers skip this shard")

    def fetch_and_check(name: str) -> tuple[list[Problem], list[str]]:
        with storage.staging_dir() as tmp:
            for n in (name, stats_name(name)):
                storage.download(storage.join(url, n), tmp)
            return _check_shard(Path(tmp) / name)

    yield from _check_all(tars, fetch_and_check, label, progress)


def _check_all(tars: list, check: Callable[[object], tuple[list[Problem], list[str]]], label: str,
               progress: bool) -> Iterator[Problem]:
    """Each shard's problems, keys found in two shards, and a dataset without a single sample."""
    samples = 0
    first_shard: dict[str, str] = {}  # key -> the shard it was first seen in: a key belongs to one shard only
    for tar in tqdm(tars, unit="shard", desc="validate", disable=not progress or not tars):
        problems, keys = check(tar)
        tar = Path(tar)
        samples += len(keys)
        yield from problems
        for key in keys:
            other = first_shard.setdefault(key, tar.name)
            if other != tar.name:
                yield Problem(tar.name, key, f"key is also in {other}: a sample must be in one shard only "
                                             "(did two jobs write into one directory?)")
    if tars and samples == 0:  # e.g. a job whose every input failed: its shards hold failure records only
        yield Problem(label, NO_KEY, f"no samples in {len(tars)} shard(s): there is nothing to train on")


def check_shard(path: str | Path) -> list[Problem]:
    """All problems of one shard tar (and of its stats file when there is one)."""
    return _check_shard(Path(path))[0]


def _check_shard(path: Path) -> tuple[list[Problem], list[str]]:
    """The problems of one shard, and the keys of the samples it holds."""
    problems: list[Problem] = []

    def report(key: str, message: str) -> None:
        problems.append(Problem(path.name, key, message))

    keys: list[str] = []
    counts: dict[str, tuple[int, int]] = {}  # key -> (segments, texts), for the stats check
    for key, members in _iter_samples(path, report):
        keys.append(key)
        meta = _check_sample(key, members, lambda msg, k=key: report(k, msg))
        if meta is not None:
            counts[key] = (len(meta.segments), sum(len(s.texts) for s in meta.segments))
    if stats_path(path).exists():
        _check_stats(path, keys, counts, report)
    return problems, keys


# -- the tar and its members ----------------------------------------------------------------------
def _iter_samples(path: Path, report) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples (members grouped by key, in tar order, one sample in memory at a time); bad names and
    types, oversized members and a truncated tar are reported."""
    names: set[str] = set()
    done: set[str] = set()
    key, members = None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            end = 0
            while (m := tf.next()) is not None:
                end = m.offset_data + (m.size + _BLOCK - 1) // _BLOCK * _BLOCK
                parsed = _check_member(m, names, report)
                if parsed is None:
                    continue
                if m.size > MAX_MEMBER_BYTES:
                    report(parsed[0], f"member {m.name!r} is {m.size} bytes, more than {MAX_MEMBER_BYTES}; not read")
                    continue
                if parsed[0] != key:
                    if key is not None:
                        yield key, members
                        done.add(key)
                    key, members = parsed[0], {}
                    if key in done:
                        report(key, f"member {m.name!r} is not next to the other members of its sample "
                                    "(webdataset would read two samples)")
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"unexpected end of data in member {m.name!r}")
                members[parsed[1]] = data
            _check_end_marker(f, end, report)
    except (tarfile.TarError, EOFError, OSError) as e:
        report(NO_KEY, f"tar is truncated or corrupt ({e}); the shard is incomplete")
    if key is not None:
        yield key, members


def _check_member(m: tarfile.TarInfo, seen: set[str], report) -> tuple[str, str] | None:
    """``(key, ext)`` of an acceptable member, or None after reporting why it is not."""
    name = m.name
    if name in seen:
        report(NO_KEY, f"member {name!r} appears twice")
        return None
    seen.add(name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        report(NO_KEY, f"member {name!r} has an absolute path")
        return None
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        report(NO_KEY, f"member {name!r} contains '..' (path traversal)")
        return None
    if len(parts) > 1:
        report(NO_KEY, f"member {name!r} is inside a directory; members must be flat KEY.EXT names")
        return None
    if not m.isreg():
        report(NO_KEY, f"member {name!r} is not a regular file (type {m.type!r})")
        return None
    key, dot, ext = name.partition(".")
    if not dot or not ext:
        report(NO_KEY, f"member {name!r} has no extension")
        return None
    if "." in ext:
        report(key or NO_KEY, f"member {name!r} has several dots: keys must not contain dots "
                              "(webdataset splits member names at the first dot)")
        return None
    if not is_valid_key(key):
        report(key or NO_KEY, f"member {name!r}: key must match [A-Za-z0-9_-]+")
        return None
    if ext.lower() not in ALLOWED_EXTENSIONS:
        report(key, f"member {name!r} has type .{ext}, which is not allowed (allowed: "
                    f"{', '.join(ALLOWED_EXTENSIONS)}; pickles and the like could run code when loaded)")
        return None
    return key, ext.lower()


def _check_end_marker(f, end: int, report) -> None:
    """A complete tar ends with two zero blocks after its last member; tarfile stops silently without."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    if size < end + 2 * _BLOCK:
        report(NO_KEY, f"tar is truncated: {size} bytes, no end-of-archive marker after the last member "
                       f"(which ends at byte {end}); the shard is incomplete")
        return
    f.seek(end)
    if f.read(2 * _BLOCK).strip(b"\0"):
        report(NO_KEY, f"tar has unreadable data at byte {end} after its last readable member")


# -- one sample -----------------------------------------------------------------------------------
def _check_sample(key: str, members: dict[str, bytes], report) -> SampleMeta | None:
    """Check one sample's members; returns its metadata when the JSON parses, for the stats check."""
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    if len(images) != 1:
        report(f"sample must have exactly one image member ({'/'.join(IMAGE_EXTENSIONS)}), has "
               f"{len(images)}: {images}")
    if "json" not in members:
        report("sample has no .json member")
        return None
    if len(members["json"]) > DEFAULT_LIMITS.max_json_bytes:
        report(f".json is {len(members['json'])} bytes, more than the limit of {DEFAULT_LIMITS.max_json_bytes}")
        return None
    try:
        meta = SampleMeta.from_dict(json.loads(members["json"]), DEFAULT_LIMITS)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report(f".json is not valid UTF-8 JSON ({e})")
        return None
    except SchemaError as e:
        report(f"JSON breaks the schema: {e}")
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a malformed value the schema missed
        report(f"JSON breaks the schema: {type(e).__name__}: {e}")
        return None
    if meta.key != key:
        report(f"JSON key {meta.key!r} differs from the member key")
    if len(images) == 1:
        if meta.image_ext != images[0]:
            report(f"JSON image_ext {meta.image_ext!r} but the image member is .{images[0]}")
        _check_image(members[images[0]], meta, report)
    for i, c in enumerate(meta.captions):
        if not c.text.strip():
            report(f"captions[{i}].text is empty")
    _check_segments(meta, report)
    return meta


def _check_image(data: bytes, meta: SampleMeta, report) -> None:
    """The image header's size (after EXIF orientation, as the reader sees it) must match the JSON.

    Read with the one decoder's header probe (:func:`shards.image.probe`), so the validator, the
    reader and the pipeline agree on orientation and on the pixel limit; no pixel is decoded."""
    try:
        info = probe_image(data, SHARD_POLICY)
    except ImageDecodeError as e:
        report(f"image .{meta.image_ext} is not a usable image ({e})")
        return
    w, h = info.width, info.height
    if (w, h) != (meta.width, meta.height):
        report(f"image is {w}x{h} (WxH) but the JSON says {meta.width}x{meta.height}; "
               "the RLEs (sized from the JSON) do not fit the image")


def _check_segments(meta: SampleMeta, report) -> None:
    """Area and bbox agree with the masks (one pycocotools call each; ``SampleMeta.from_dict`` already
    parsed every RLE strictly and checked that it covers the image)."""
    ids = [s.id for s in meta.segments]
    if len(set(ids)) != len(ids):
        report(f"segment ids are not unique: {ids}")
    if not meta.segments:
        return
    rles = [s.rle for s in meta.segments]
    areas, boxes = rle.area(rles), rle.bbox(rles)
    for i, (s, a, box) in enumerate(zip(meta.segments, areas, boxes, strict=True)):
        where = f"segments[{i}] (id {s.id})"
        if a == 0:
            report(f"{where}: mask is empty")
            continue
        if s.area != a:
            report(f"{where}: area {s.area} but the mask has {int(a)} pixels")
        if np.abs(np.asarray(s.bbox) - box).max() > 1.0:
            report(f"{where}: bbox {_fmt(s.bbox)} but the mask's box is {_fmt(box)} (more than 1 px apart)")


def _fmt(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


# -- the stats file -------------------------------------------------------------------------------
def _check_stats(path: Path, keys: list[str], counts: dict[str, tuple[int, int]], report) -> None:
    """The stats file is the job's resume state: its hash, keys and counts must describe this tar."""
    st = stats_path(path)
    try:
        stats = json.loads(st.read_text())
        listed = [k["key"] for k in stats["keys"]]
        rows = {k["key"]: k for k in stats["keys"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        report(NO_KEY, f"stats file {st.name} is unreadable ({type(e).__name__}: {e})")
        return
    if stats.get("shard") != path.name:
        report(NO_KEY, f"stats file names shard {stats.get('shard')!r}, not {path.name!r}")
    digest = file_sha256(path)
    if stats.get("sha256") != digest:
        report(NO_KEY, f"sha256 of the tar ({digest[:12]}...) differs from the stats file's "
                       f"({str(stats.get('sha256'))[:12]}...): the tar changed after it was written")
    missing, extra = set(keys) - set(listed), set(listed) - set(keys)
    for key in sorted(missing):
        report(key, f"sample is in the tar but not in {st.name} (a resumed job would write it again)")
    for key in sorted(extra):
        report(key, f"sample is listed in {st.name} but not in the tar (a resumed job would skip it)")
    if stats.get("samples") != len(listed):
        report(NO_KEY, f"stats file says {stats.get('samples')} samples but lists {len(listed)} keys")
    for key, (n_segments, n_texts) in counts.items():
        row = rows.get(key)
        if row is not None and (row.get("segments"), row.get("texts")) != (n_segments, n_texts):
            report(key, f"stats file says {row.get('segments')} segments / {row.get('texts')} texts, the JSON "
                        f"has {n_segments} / {n_texts}")

