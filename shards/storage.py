"""Where shards and inputs live: local paths, or ``s3://`` / ``gs://`` URLs through fsspec.

The one seam between the project and object storage. Every function takes a local path or a URL;
a local path runs the plain ``os`` / ``pathlib`` code it always ran (same atomic renames, same
speed), a URL goes through fsspec (``s3fs``, ``gcsfs``). Credentials are never ours: s3fs and
gcsfs read the usual environment and config (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``GOOGLE_APPLICATION_CREDENTIALS``, instance
roles), in the driver and in every Ray worker alike.

Object storage has no atomic rename, so a shard there is committed by upload order: the tar
object first, its stats object last (:func:`commit_files`). An object appears whole or not at all
(a multipart upload is invisible until completed), so a shard is complete exactly when its stats
object exists, and every reader takes only those (:func:`committed`). A writer killed between the
two uploads leaves a tar without stats, which readers skip and :func:`remove_uncommitted` deletes
once no writer runs (as ``shards.writer.recover`` does for local temp files).

File systems are built with ``use_listings_cache=False``: write tasks in other processes add
objects all the time, and a cached listing would hide them (s3fs answers ``exists`` from a cached
listing of the parent). Instances are cached by fsspec per process and rebuilt after a fork, so a
DataLoader worker gets its own.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

#: URL schemes accepted for inputs, outputs and shards (fsspec protocols of s3fs and gcsfs).
SCHEMES = ("s3", "s3a", "gs", "gcs")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20

PathLike = str | os.PathLike


def scheme(url: PathLike) -> str:
    """The URL scheme (``s3``), or ``""`` for a local path."""
    m = _SCHEME_RE.match(str(url))
    return m[1].lower() if m else ""


def is_remote(url: PathLike | None) -> bool:
    """Whether ``url`` names object storage (``s3://``, ``gs://``) rather than a local path."""
    return url is not None and not isinstance(url, Path) and scheme(url) in SCHEMES


def check_url(url: PathLike, what: str) -> None:
    """Refuse a URL of a scheme this project cannot read or write (a path or s3/gs URL passes)."""
    s = scheme(url)
    if s and s not in SCHEMES and s != "file":
        raise ValueError(f"{what} {url}: unsupported URL scheme {s}://; use a path, s3:// or gs://")


def open_fs(url: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of ``url`` and the path inside it (``bucket/key`` for object storage)."""
    if is_remote(url):
        return fsspec.core.url_to_fs(str(url), use_listings_cache=False)
    return fsspec.filesystem("file"), os.path.abspath(os.fspath(url))


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def join(base: PathLike, *names: str) -> str:
    """``base/name/...``: a URL stays a URL (``posixpath``), a local path stays a local path."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return os.path.join(os.fspath(base), *names)


def basename(url: PathLike) -> str:
    return posixpath.basename(str(url).rstrip("/")) if is_remote(url) else os.path.basename(os.fspath(url))


def dirname(url: PathLike) -> str:
    return posixpath.dirname(str(url).rstrip("/")) if is_remote(url) else os.path.dirname(os.fspath(url))


def exists(url: PathLike) -> bool:
    """A file or object (or, for a prefix, any object under it) exists."""
    if not is_remote(url):
        return os.path.exists(url)
    fs, path = open_fs(url)
    return fs.exists(path)


def isdir(url: PathLike) -> bool:
    """A directory, or a prefix with at least one object under it."""
    if not is_remote(url):
        return os.path.isdir(url)
    fs, path = open_fs(url)
    return fs.isdir(path)


def size(url: PathLike) -> int:
    if not is_remote(url):
        return os.stat(url).st_size
    fs, path = open_fs(url)
    return int(fs.size(path))


def listdir(url: PathLike) -> dict[str, int]:
    """``{name: size}`` of the files directly in a directory or prefix (one listing; nothing if absent)."""
    if not is_remote(url):
        try:
            return {e.name: e.stat().st_size for e in os.scandir(url) if e.is_file()}
        except FileNotFoundError:
            return {}
    fs, path = open_fs(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
            if e.get("type") == "file"}


def files_under(url: PathLike) -> Iterator[str]:
    """Paths relative to ``url`` of every file below it, sorted (one recursive listing on object storage)."""
    fs, path = open_fs(url)
    root = path.rstrip("/") + "/"
    for p in sorted(fs.find(path)):
        if p.startswith(root):
            yield p[len(root):]


def read_bytes(url: PathLike) -> bytes:
    if not is_remote(url):
        with open(url, "rb") as f:
            return f.read()
    fs, path = open_fs(url)
    return fs.cat_file(path)


def read_text(url: PathLike) -> str:
    return read_bytes(url).decode()


def read_many(urls: list[str]) -> dict[str, bytes]:
    """The bytes of many small files or objects; object storage fetches them concurrently (one call)."""
    remote = [u for u in urls if is_remote(u)]
    out = {u: read_bytes(u) for u in urls if not is_remote(u)}
    if remote:
        fs, _ = open_fs(remote[0])
        paths = {open_fs(u)[1]: u for u in remote}
        for p, data in fs.cat(list(paths), on_error="raise").items():
            out[paths[p]] = data
    return out


def write_bytes(url: PathLike, data: bytes) -> None:
    """Write a small file whole: a temp name then ``os.replace`` locally; one PUT (atomic) on object storage."""
    if not is_remote(url):
        path = Path(url)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    fs, path = open_fs(url)
    fs.pipe_file(path, data)


def write_text(url: PathLike, text: str) -> None:
    write_bytes(url, text.encode())


def remove(url: PathLike) -> None:
    """Delete a file or object; an absent one is not an error."""
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    fs, path = open_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def makedirs(url: PathLike) -> None:
    """A local directory (and its parents); object storage has no directories to make."""
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)


def open_read(url: PathLike, block_size: int = 8 << 20) -> IO[bytes]:
    """A seekable binary stream of a file or object (fsspec's read-ahead buffer on object storage)."""
    if not is_remote(url):
        return open(url, "rb")  # noqa: SIM115 (the caller closes it)
    fs, path = open_fs(url)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def sha256(url: PathLike) -> str:
    """The sha256 of a file or object, streamed."""
    h = hashlib.sha256()
    with open_read(url) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, directory: PathLike, max_bytes: int | None = None) -> Path:
    """Copy an object into ``directory`` under its own name (the same name in error messages)."""
    if max_bytes is not None and size(url) > max_bytes:
        raise ValueError(f"{url} is larger than {max_bytes} bytes")
    fs, path = open_fs(url)
    local = Path(directory) / basename(url)
    fs.get_file(path, str(local))
    return local


_CACHE: tempfile.TemporaryDirectory | None = None


def local_copy(url: str) -> Path:
    """A fresh local copy of an object, for readers that need a real file (``ijson`` streams, ``mmap``):
    the annotation files. Under its own name in one temporary directory per process, removed at exit;
    a later copy of the same URL replaces it."""
    global _CACHE
    if _CACHE is None:
        _CACHE = tempfile.TemporaryDirectory(prefix="use-storage-")
    where = Path(_CACHE.name) / hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
    where.mkdir(exist_ok=True)
    return download(url, where)


def read_under(root: str, rel: str, max_bytes: int) -> bytes:
    """The bytes of object ``root/rel``, at most ``max_bytes`` of them (an image of a source).

    ``rel`` was already checked lexically (no ``..``, not absolute, no NUL; see
    ``pipeline.sources.base.relative_name``); here the key it makes must still lie under ``root``'s
    prefix. Raises ``FileNotFoundError`` / ``PermissionError`` (the environment's fault: a rerun
    retries) or ``ValueError`` (not a file, too large: the input's fault).
    """
    fs, base = open_fs(root)
    base = base.rstrip("/")
    path = posixpath.normpath(posixpath.join(base, rel))
    if not path.startswith(base + "/"):
        raise ValueError("names an object outside --images")
    info = fs.info(path)
    if info.get("type") != "file":
        raise ValueError("not a regular file")
    if int(info.get("size") or 0) > max_bytes:
        raise ValueError(f"file is larger than read.max_bytes={max_bytes}")
    data = fs.cat_file(path, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:  # grew after the listing
        raise ValueError(f"file is larger than read.max_bytes={max_bytes}")
    return data


# -- shards on object storage: upload order is the commit ---------------------------------------
def commit_files(tar_local: PathLike, tar_url: str, stats: bytes, stats_url: str) -> None:
    """Publish a finished local tar as a shard on object storage: the tar object, then the stats
    object last. A crash between the two leaves a tar that no reader takes (:func:`committed`)."""
    fs, tar_path = open_fs(tar_url)
    fs.put_file(os.fspath(tar_local), tar_path)
    fs.pipe_file(open_fs(stats_url)[1], stats)


def committed(names: Iterable[str], stats_name: Any) -> list[str]:
    """The tar names of ``names`` (a listing) whose stats object (``stats_name(tar)``) is listed too."""
    names = set(names)
    return sorted(n for n in names if n.endswith(".tar") and stats_name(n) in names)


def remove_uncommitted(url: str, tars: Iterable[str]) -> list[str]:
    """Delete tar objects of ``url`` that have no stats object, and abort unfinished multipart
    uploads under ``url`` (S3 keeps their parts, and bills them, until aborted). Only while no writer
    writes there: the job calls it before its write tasks start and after they end."""
    removed = []
    for name in tars:
        remove(join(url, name))
        removed.append(name)
    fs, path = open_fs(url)
    if hasattr(fs, "call_s3"):  # s3fs; gcsfs resumable uploads expire by themselves
        bucket, _, prefix = path.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        for up in out.get("Uploads", []):
            if "/" not in up["Key"][len(prefix):]:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                removed.append(posixpath.basename(up["Key"]) + " (unfinished upload)")
    return removed


def staging_dir() -> tempfile.TemporaryDirectory:
    """A local temporary directory where a shard is built before its upload."""
    return tempfile.TemporaryDirectory(prefix="use-shard-")

