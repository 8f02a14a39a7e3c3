"""Atomic, resumable shard writers.

A shard is the pair ``PREFIX-ID.tar`` + ``PREFIX-ID.stats.json``. Both are written under a
temporary name and renamed in a fixed order (tar, then stats), so a crash at any instant leaves
either nothing under a final name or a complete tar; :func:`recover` finishes or removes what a
crash left. The stats files are the job's state (as in img2dataset): they list every key written
and every failure recorded in that shard, so a rerun knows exactly which inputs are done.

Two writers share that commit: :class:`ShardWriter`, one process streaming numbered shards
(``ID`` = ``NNNNNN``, in commit order), and :func:`write_shards`, called by many write tasks at once
(the curation job's Ray workers): each call commits whole shards named by their content (``ID`` =
16 hex digits of a hash of the run token and the shard's keys), so a task that Ray re-executes on
the same input finds its shards already committed and writes nothing twice. A re-execution that
grouped the keys differently (new names) leaves a key in two shards; :func:`drop_duplicates`
removes the later copies by a fixed rule when the manifest is built.

``out_dir`` may also be an ``s3://`` or ``gs://`` URL (:mod:`shards.storage`), for
:func:`write_shards` and every reader here: a shard is built in a local temporary directory, then
its tar object is uploaded and its stats object last; a shard counts as committed only when its
stats object exists, and :func:`recover` deletes tar objects left without one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from . import storage
from .schema import IMAGE_EXTENSIONS, SampleMeta, is_valid_key

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6}|[0-9a-f]{16})\.tar$")
_DIGITS = 6  # numbered shards (ShardWriter); content-named ones (write_shards) have 16 hex digits
#: Shard prefixes name files inside the output directory: no separators, dots or spaces.
PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_path(tar_path: Path | str) -> Path | str:
    """The stats file of a shard (a URL string for a shard on object storage)."""
    if storage.is_remote(tar_path):
        return storage.join(storage.dirname(tar_path), stats_name(storage.basename(tar_path)))
    p = Path(tar_path)
    return p.with_name(stats_name(p.name))


def stats_name(tar_name: str) -> str:
    return tar_name.removesuffix(".tar") + ".stats.json"


def _tmp(path: Path, token: str = "") -> Path:
    """The temporary name of ``path``; a ``token`` keeps concurrent attempts at one shard apart."""
    return path.with_name(f".{path.name}.{token}.tmp" if token else f".{path.name}.tmp")


def _final_of(tmp: Path) -> Path:
    name = tmp.name[1:-len(".tmp")]
    if not name.endswith((".tar", ".stats.json")):
        name = name.rsplit(".", 1)[0]  # drop the attempt token
    return tmp.with_name(name)


@dataclass
class ShardStats:
    """What one shard holds; written beside it as JSON and gathered into the manifest."""

    shard: str
    samples: int = 0
    segments: int = 0
    texts: int = 0
    bytes: int = 0
    sha256: str = ""
    keys: list[dict] = field(default_factory=list)  # {key, image_id, source, width, height, segments, texts}
    failures: list[dict] = field(default_factory=list)  # {key, stage, error}
    sources: dict[str, int] = field(default_factory=dict)  # text source -> count
    created: float = 0.0
    run: str = ""  # the job run that wrote it (write_shards); part of a content-named shard's name

    def add_sample(self, meta: SampleMeta) -> None:
        n_texts = sum(len(s.texts) for s in meta.segments)
        self.samples += 1
        self.segments += len(meta.segments)
        self.texts += n_texts
        for s in meta.segments:
            for t in s.texts:
                self.sources[t.source] = self.sources.get(t.source, 0) + 1
        self.keys.append({"key": meta.key, "image_id": meta.image_id, "source": meta.source, "width": meta.width,
                          "height": meta.height, "segments": len(meta.segments), "texts": n_texts})


def _members(meta: SampleMeta, image_bytes: bytes, extras: dict[str, bytes] | None = None) -> dict[str, bytes]:
    if not is_valid_key(meta.key):
        raise ValueError(f"invalid key {meta.key!r}: use shards.make_key (no dots)")
    if meta.image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"image_ext {meta.image_ext!r} not in {IMAGE_EXTENSIONS}")
    members = {"json": json.dumps(meta.to_dict(), separators=(",", ":")).encode(), meta.image_ext: image_bytes}
    members.update(extras or {})
    return members


def _commit(tmp: Path, final: Path, stats: ShardStats, token: str = "") -> None:
    """Publish a closed, fsynced temp tar: stats temp written, then tar renamed, then stats renamed.

    Both temp files are on disk before either rename: a tar under its final name always has its
    stats (final or temp, which :func:`recover` commits once it checks the hash), even after a power loss.
    """
    stats.sha256 = file_sha256(tmp)
    stats.created = time.time()
    st_final = stats_path(final)
    st_tmp = _tmp(st_final, token)
    _write_synced(st_tmp, json.dumps(stats.__dict__, indent=1).encode())
    os.replace(tmp, final)
    os.replace(st_tmp, st_final)
    _fsync_dir(final.parent)  # the renames themselves survive a power loss


class ShardWriter:
    """Streams samples into size-bounded shards, each appearing atomically.

    ``write`` takes the typed metadata and the original image bytes; ``add_failure`` records an
    input that could not become a sample, in the shard being filled, so that a key is either in a
    shard or in a failure record of a committed shard, never both and never lost.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int = 1 << 30):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"shard prefix {prefix!r} must match {PREFIX_RE.pattern} (it names files in {out_dir})")
        if storage.is_remote(out_dir):
            raise ValueError(f"{out_dir}: ShardWriter writes local directories; write_shards writes object storage")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        recover(self.out_dir)
        self.index = next_index(self.out_dir, prefix)
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._stats: ShardStats | None = None
        self._keys: set[str] = set()

    # -- public API -------------------------------------------------------------------------
    def write(self, meta: SampleMeta, image_bytes: bytes, extras: dict[str, bytes] | None = None) -> None:
        """Add one sample: ``meta`` as ``KEY.json``, the image as ``KEY.<meta.image_ext>``."""
        members = _members(meta, image_bytes, extras)
        if meta.key in self._keys:
            raise ValueError(f"key {meta.key!r} written twice in this job")
        self._keys.add(meta.key)
        stats = self._open()
        stats.bytes += self._tar.write({"__key__": meta.key, **members})
        stats.add_sample(meta)
        if stats.samples >= self.max_samples or stats.bytes >= self.max_bytes:
            self.flush()

    def __contains__(self, key: str) -> bool:
        """Whether this writer already wrote or recorded ``key`` (in this run)."""
        return key in self._keys

    def add_failure(self, key: str, stage: str, error: str, retry: bool = False) -> None:
        """Record an input that did not become a sample (committed with the current shard).

        ``retry``: the cause was the environment (a missing file, a permission), so a rerun of the
        job tries the input again; a later record of the same key (written or failed) supersedes it.
        """
        if key in self._keys:
            raise ValueError(f"key {key!r} already recorded in this job")
        self._keys.add(key)
        self._open().failures.append({"key": key, "stage": stage, "error": str(error), **({"retry": True} if retry else {})})

    def flush(self) -> Path | None:
        """Commit the shard being filled (if any): fsync, rename tar, then rename stats."""
        if self._stats is None:
            return None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / self._stats.shard
        _commit(_tmp(final), final, self._stats)
        log.info("wrote %s: %d samples, %d segments, %d failures", final.name, self._stats.samples,
                 self._stats.segments, len(self._stats.failures))
        self._tar = self._file = self._stats = None
        self.index += 1
        return final

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no partial shard behind; the inputs are redone on resume
            self.abort()

    def abort(self) -> None:
        if self._stats is not None:
            self._tar.close()
            self._file.close()
            _tmp(self.out_dir / self._stats.shard).unlink(missing_ok=True)
            self._tar = self._file = self._stats = None

    # -- internals --------------------------------------------------------------------------
    def _open(self) -> ShardStats:
        if self._stats is None:
            name = shard_name(self.prefix, self.index)
            self._file = open(_tmp(self.out_dir / name), "wb")  # noqa: SIM115 (closed in flush/abort)
            # encoder=False: members are already bytes; mtime=0 makes identical inputs give identical shards.
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
            self._stats = ShardStats(shard=name)
        return self._stats


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on some platforms (Windows); the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_shards(out_dir: str | Path, prefix: str | None = None) -> list[Path]:
    """Final shard tars in a directory, sorted by name.

    On object storage (a URL; the result is URL strings) only committed shards: those whose stats
    object exists (a tar without it is an upload in progress or one a crash cut short)."""
    if storage.is_remote(out_dir):
        return [storage.join(out_dir, name) for name in storage.committed(storage.listdir(out_dir), stats_name)
                if (m := _SHARD_RE.match(name)) and (prefix is None or m["prefix"] == prefix)]
    out = []
    for p in sorted(Path(out_dir).glob("*.tar")):
        m = _SHARD_RE.match(p.name)
        if m and (prefix is None or m["prefix"] == prefix):
            out.append(p)
    return out


def is_shard_name(name: str) -> bool:
    """Whether a file name is a shard tar's (``PREFIX-NNNNNN.tar`` or ``PREFIX-<16 hex>.tar``)."""
    return _SHARD_RE.match(name) is not None


def next_index(out_dir: str | Path, prefix: str) -> int:
    """The number after the last numbered shard (content-named shards do not count)."""
    numbers = [int(i) for i in (_SHARD_RE.match(t.name)["index"] for t in list_shards(out_dir, prefix))
               if len(i) == _DIGITS]
    return max(numbers) + 1 if numbers else 0


def recover(out_dir: str | Path) -> None:
    """Finish or discard what a crash left: commit a stats temp file whose tar is final and has the
    hash it names (not one of another attempt at the same shard), delete the rest.

    Only while no writer runs (the job calls it before its write tasks start and after they end).
    On object storage: delete tar objects without a stats object and unfinished uploads.
    """
    if storage.is_remote(out_dir):
        names = storage.listdir(out_dir)
        orphans = [n for n in names if _SHARD_RE.match(n) and stats_name(n) not in names]
        for name in storage.remove_uncommitted(str(out_dir), orphans):
            log.warning("removed %s left by an interrupted upload", name)
        return
    out_dir = Path(out_dir)
    for tmp in sorted(out_dir.glob(".*.tmp")):
        final = _final_of(tmp)
        tar = final.with_name(final.name.removesuffix(".stats.json") + ".tar")
        if final.name.endswith(".stats.json") and tar.exists() and _stats_sha(tmp) == file_sha256(tar):
            os.replace(tmp, final)
            log.warning("recovered %s after an interrupted commit", final.name)
        else:
            tmp.unlink(missing_ok=True)
            log.warning("removed %s left by an interrupted job", tmp.name)


def _stats_sha(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def commit_order(out_dir: str | Path) -> list[tuple[Path, ShardStats | None]]:
    """Committed shards with their stats, oldest commit first (numbered shards have no other order
    than their numbers; content-named ones have their commit time); ``None`` for a tar without stats
    (placed by its modification time)."""
    if storage.is_remote(out_dir):  # committed shards only; their stats fetched concurrently
        tars = list_shards(out_dir)
        data = storage.read_many([stats_path(t) for t in tars])
        rows = [(st.created, storage.basename(t), t, st)
                for t in tars for st in [ShardStats(**json.loads(data[stats_path(t)]))]]
        return [(tar, st) for _, _, tar, st in sorted(rows, key=lambda r: r[:2])]
    rows = []
    for tar in list_shards(out_dir):
        st = read_stats(tar) if stats_path(tar).exists() else None
        rows.append((st.created if st else tar.stat().st_mtime, tar.name, tar, st))
    return [(tar, st) for _, _, tar, st in sorted(rows, key=lambda r: r[:2])]


# -- many writers: whole shards per call, named by content -----------------------------------------
Row = tuple[SampleMeta, bytes] | dict  # a sample, or a failure record {key, stage, error[, retry]}


def _member_bytes(members: dict[str, bytes]) -> int:
    return sum(512 + -(-len(v) // 512) * 512 for v in members.values())  # tar header + padded data


def write_shards(out_dir: str | Path, prefix: str, rows: Iterable[Row], *, run: str, max_samples: int = 1000,
                 max_bytes: int = 1 << 30) -> list[ShardStats]:
    """Commit ``rows`` as whole shards of at most ``max_samples`` samples (closed once past ``max_bytes``).

    The write half of a Ray Data datasink, for many concurrent callers: no shared counter, no
    :func:`recover` (which would delete the others' temp files). A shard is named
    ``PREFIX-<hash of run and its keys>``; when that shard's stats already exist (an earlier attempt of
    this same task committed it before its worker died) it is returned as it is, not written again.
    Failures ride along in the stats of the shard they are grouped with, as in :class:`ShardWriter`.
    """
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"shard prefix {prefix!r} must match {PREFIX_RE.pattern}")
    if storage.is_remote(out_dir):
        out_dir = str(out_dir)
    else:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[Row, dict[str, bytes] | None]]] = [[]]
    n = size = 0
    for row in rows:
        members = None if isinstance(row, dict) else _members(*row)
        groups[-1].append((row, members))
        if members is not None:
            n, size = n + 1, size + _member_bytes(members)
            if n >= max_samples or size >= max_bytes:
                groups.append([])
                n = size = 0
    return [_write_group(out_dir, prefix, group, run) for group in groups if group]


def _key(row: Row) -> str:
    return row["key"] if isinstance(row, dict) else row[0].key


def _write_group(out_dir: Path | str, prefix: str, group: list[tuple[Row, dict[str, bytes] | None]],
                 run: str) -> ShardStats:
    keys = sorted(_key(r) for r, _ in group)
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key appears twice in one write: {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    digest = hashlib.blake2b("\n".join([run, *keys]).encode(), digest_size=8).hexdigest()
    name = f"{prefix}-{digest}.tar"
    if storage.is_remote(out_dir):
        final = storage.join(out_dir, name)
        if storage.exists(stats_path(final)):
            log.info("%s was committed by an earlier attempt of this write; kept", name)
            return read_stats(final)
        stats = ShardStats(shard=name, run=run)
        with storage.staging_dir() as staging:  # built locally, then uploaded: tar first, stats last
            _fill_tar(Path(staging) / name, group, stats)
            _commit_remote(Path(staging) / name, final, stats)
        log.info("wrote %s: %d samples, %d failures", final, stats.samples, len(stats.failures))
        return stats
    final = out_dir / name
    if stats_path(final).exists():
        log.info("%s was committed by an earlier attempt of this write; kept", final.name)
        return read_stats(final)
    token = uuid.uuid4().hex[:12]
    tmp = _tmp(final, token)
    stats = ShardStats(shard=final.name, run=run)
    try:
        _fill_tar(tmp, group, stats)
        _commit(tmp, final, stats, token)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s: %d samples, %d failures", final.name, stats.samples, len(stats.failures))
    return stats


def _fill_tar(path: Path, group: list[tuple[Row, dict[str, bytes] | None]], stats: ShardStats) -> None:
    """Write the samples of ``group`` into a new tar at ``path`` (fsynced) and its failures into ``stats``."""
    with open(path, "wb") as f:
        tar = wds.TarWriter(f, encoder=False, mtime=0)
        for row, members in group:
            if members is None:
                stats.failures.append({"key": row["key"], "stage": row["stage"], "error": str(row["error"]),
                                      **({"retry": True} if row.get("retry") else {})})
                continue
            stats.bytes += tar.write({"__key__": row[0].key, **members})
            stats.add_sample(row[0])
        tar.close()
        f.flush()
        os.fsync(f.fileno())


def _commit_remote(local_tar: Path, final: str, stats: ShardStats) -> None:
    """Upload a finished local tar as shard ``final`` on object storage: tar object, then stats object."""
    stats.sha256 = file_sha256(local_tar)
    stats.created = time.time()
    storage.commit_files(local_tar, final, json.dumps(stats.__dict__, indent=1).encode(), stats_path(final))


def drop_duplicates(out_dir: str | Path) -> dict[str, list[str]]:
    """Remove every copy but the first of a key written into more than one shard; returns
    ``{shard: keys removed}``.

    Only a write task re-executed on a different grouping of its rows can do that (the same grouping
    gives the same shard names, see :func:`write_shards`). The rule is fixed: the copy in the shard
    committed first (:func:`commit_order`) stays; the later shards are rewritten without the key
    (temp tar, stats, renames: the same atomic commit), so readers of the tars see each key once.
    """
    seen: set[str] = set()
    drops: dict[Path, set[str]] = {}
    for tar, st in commit_order(out_dir):
        if st is None:
            continue
        keys = [k["key"] for k in st.keys]
        dup = seen.intersection(keys)
        if dup:
            drops[tar] = dup
        seen.update(keys)
    for tar, keys in drops.items():
        log.warning("%s: %d key(s) also in an earlier shard (a re-executed write task); removing them here",
                    _name(tar), len(keys))
        _rewrite_without(tar, keys)
    return {_name(tar): sorted(keys) for tar, keys in drops.items()}


def _name(tar: Path | str) -> str:
    return storage.basename(tar) if storage.is_remote(tar) else tar.name


def _rewrite_without(tar_path: Path | str, drop: set[str]) -> None:
    old = read_stats(tar_path)
    stats = ShardStats(shard=old.shard, failures=old.failures, run=old.run)
    if storage.is_remote(tar_path):
        # No rename there: the stats object goes first, so until the new tar and stats are up the shard
        # is not committed (a crash here makes a rerun redo its other keys; none is ever in two shards).
        with storage.staging_dir() as staging:
            src, tmp = Path(staging) / "old.tar", Path(staging) / old.shard
            fs, path = storage.open_fs(tar_path)
            fs.get_file(path, str(src))
            _copy_without(src, tmp, drop, stats)
            storage.remove(stats_path(tar_path))
            _commit_remote(tmp, tar_path, stats)
        return
    token = uuid.uuid4().hex[:12]
    tmp = _tmp(tar_path, token)
    try:
        _copy_without(tar_path, tmp, drop, stats)
        _commit(tmp, tar_path, stats, token)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_without(src_path: Path, tmp: Path, drop: set[str], stats: ShardStats) -> None:
    """Copy a shard tar without the samples of ``drop`` (fsynced), counting what stays into ``stats``."""
    with tarfile.open(src_path) as src, open(tmp, "wb") as f:
        out = tarfile.open(fileobj=f, mode="w")  # same members, byte for byte, minus the dropped keys
        for m in src:
            key = m.name.split(".", 1)[0]
            if key in drop:
                continue
            data = src.extractfile(m).read() if m.isfile() else None
            out.addfile(m, None if data is None else io.BytesIO(data))
            if m.name.endswith(".json") and data is not None:
                stats.add_sample(SampleMeta.from_dict(json.loads(data)))
        out.close()
        f.flush()
        os.fsync(f.fileno())
    stats.bytes = tmp.stat().st_size


def read_stats(tar_path: Path | str) -> ShardStats:
    if storage.is_remote(tar_path):
        return ShardStats(**json.loads(storage.read_bytes(stats_path(tar_path))))
    data = json.loads(stats_path(tar_path).read_text())
    return ShardStats(**data)


def done_keys(out_dir: str | Path, *, finish_commits: bool = True) -> tuple[set[str], set[str]]:
    """Keys already written and keys whose latest record is a failure, from the committed shards.

    ``finish_commits=False`` reads without :func:`recover` (which deletes temp files): for a look at a
    directory that another job may be writing.
    """
    written, latest = _records(out_dir, finish_commits)
    return written, set(latest)


def failure_records(out_dir: str | Path, *, finish_commits: bool = True) -> dict[str, dict]:
    """The latest failure record (``key, stage, error``, ``retry`` when true) of every key not written."""
    return _records(out_dir, finish_commits)[1]


def _records(out_dir: str | Path, finish_commits: bool = True) -> tuple[set[str], dict[str, dict]]:
    """Shards in commit order: a key written anywhere is written; otherwise its last failure stands."""
    if finish_commits:
        recover(out_dir)
    written: set[str] = set()
    failures: dict[str, dict] = {}
    for tar, stats in commit_order(out_dir):
        if stats is None:
            if not finish_commits:  # its stats may still be a temp file of a commit in progress
                continue
            log.warning("%s has no stats file; its keys are taken from the tar", tar.name)
            with tarfile.open(tar) as tf:
                written.update(m.name.split(".", 1)[0] for m in tf.getmembers())
            continue
        written.update(k["key"] for k in stats.keys)
        failures.update((f["key"], f) for f in stats.failures)
    return written, {k: f for k, f in failures.items() if k not in written}
