"""Atomic, resumable shard writer.

A shard is the pair ``PREFIX-NNNNNN.tar`` + ``PREFIX-NNNNNN.stats.json``. Both are written under a
temporary name and renamed in a fixed order (tar, then stats), so a crash at any instant leaves
either nothing under a final name or a complete tar; :func:`recover` finishes or removes what a
crash left. The stats files are the job's state (as in img2dataset): they list every key written
and every failure recorded in that shard, so a rerun knows exactly which inputs are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from .schema import IMAGE_EXTENSIONS, SampleMeta, is_valid_key

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6})\.tar$")
#: Shard prefixes name files inside the output directory: no separators, dots or spaces.
PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_path(tar_path: Path | str) -> Path:
    p = Path(tar_path)
    return p.with_name(p.name.removesuffix(".tar") + ".stats.json")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


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
        if not is_valid_key(meta.key):
            raise ValueError(f"invalid key {meta.key!r}: use shards.make_key (no dots)")
        if meta.image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_ext {meta.image_ext!r} not in {IMAGE_EXTENSIONS}")
        if meta.key in self._keys:
            raise ValueError(f"key {meta.key!r} written twice in this job")
        self._keys.add(meta.key)
        members = {"json": json.dumps(meta.to_dict(), separators=(",", ":")).encode(), meta.image_ext: image_bytes}
        for ext, data in (extras or {}).items():
            members[ext] = data
        stats = self._open()
        stats.bytes += self._tar.write({"__key__": meta.key, **members})
        n_texts = sum(len(s.texts) for s in meta.segments)
        stats.samples += 1
        stats.segments += len(meta.segments)
        stats.texts += n_texts
        for s in meta.segments:
            for t in s.texts:
                stats.sources[t.source] = stats.sources.get(t.source, 0) + 1
        stats.keys.append({"key": meta.key, "image_id": meta.image_id, "source": meta.source, "width": meta.width,
                           "height": meta.height, "segments": len(meta.segments), "texts": n_texts})
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
        tmp = _tmp(final)
        self._stats.sha256 = file_sha256(tmp)
        self._stats.created = time.time()
        st_final = stats_path(final)
        st_tmp = _tmp(st_final)
        _write_synced(st_tmp, json.dumps(self._stats.__dict__, indent=1).encode())
        # Both temp files are on disk before either rename: a tar under its final name always has its
        # stats (final or temp, which recover() commits), even after a power loss.
        os.replace(tmp, final)
        os.replace(st_tmp, st_final)
        _fsync_dir(self.out_dir)  # the renames themselves survive a power loss
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
    """Final shard tars in a directory, sorted by name."""
    out = []
    for p in sorted(Path(out_dir).glob("*.tar")):
        m = _SHARD_RE.match(p.name)
        if m and (prefix is None or m["prefix"] == prefix):
            out.append(p)
    return out


def next_index(out_dir: str | Path, prefix: str) -> int:
    shards = list_shards(out_dir, prefix)
    return int(_SHARD_RE.match(shards[-1].name)["index"]) + 1 if shards else 0


def recover(out_dir: str | Path) -> None:
    """Finish or discard what a crash left: commit a stats temp file whose tar is final, delete the rest."""
    out_dir = Path(out_dir)
    for tmp in out_dir.glob(".*.tmp"):
        final = tmp.with_name(tmp.name[1:-len(".tmp")])
        if final.name.endswith(".stats.json") and final.with_name(final.name.replace(".stats.json", ".tar")).exists():
            os.replace(tmp, final)
            log.warning("recovered %s after an interrupted commit", final.name)
        else:
            tmp.unlink(missing_ok=True)
            log.warning("removed %s left by an interrupted job", tmp.name)


def read_stats(tar_path: Path | str) -> ShardStats:
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
    for tar in list_shards(out_dir):
        st = stats_path(tar)
        if not st.exists():
            if not finish_commits:  # its stats may still be a temp file of a commit in progress
                continue
            log.warning("%s has no stats file; its keys are taken from the tar", tar.name)
            with tarfile.open(tar) as tf:
                written.update(m.name.split(".", 1)[0] for m in tf.getmembers())
            continue
        stats = read_stats(tar)
        written.update(k["key"] for k in stats.keys)
        failures.update((f["key"], f) for f in stats.failures)
    return written, {k: f for k, f in failures.items() if k not in written}
