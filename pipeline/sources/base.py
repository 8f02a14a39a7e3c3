"""What every source shares: the plan/read split and the one read of each image.

As in img2dataset's reader/worker split, a source works in two steps:

- ``plan()`` runs once in the driver: it parses and validates the annotation files (a malformed
  file raises :class:`SourceError` before any work starts) and yields light *items*
  ``{key, path, record, ann}`` (``ann`` is the raw per-image annotation payload as JSON).
- :func:`read_item` runs in Ray tasks near the data: it reads the image bytes once, checks them
  (:func:`probe`), and turns the raw annotations into shard segments (``materialize``), so that the
  costly mask conversion is spread over the cluster instead of the driver.

An item that is already known to be bad (an annotation pointing to an unknown image) carries
``record.failure`` from the plan and is passed through untouched.

Annotation files and folders come from other people, so the read treats names as untrusted: a
``file_name`` must be a relative path inside ``--images`` (no ``..``, no absolute path, no NUL),
its resolved path (symlinks followed) must stay inside the root unless
``read.follow_symlinks_outside`` allows it, only regular files are read (a FIFO or ``/dev/zero``
would block or never end), at most ``read.max_bytes`` of them, and any exception of the read is that
image's failure. Failure messages name the ``file_name`` only: no absolute path, no file size.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from PIL import Image

from pipeline.record import Record
from shards import storage
from shards.image import DEFAULT_POLICY, ImageDecodeError, ReadPolicy, decode_image
from shards.image import probe as probe_header

#: PIL format name -> the shard image extension (shards hold original bytes of these only).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class SourceError(ValueError):
    """A source that cannot be planned (missing or malformed annotation file); names the file."""


class ReadError(ValueError):
    """An image that cannot be used; the message is the failure reason."""


@dataclass
class Probe:
    width: int  # after EXIF orientation
    height: int
    raw_width: int  # as stored
    raw_height: int
    ext: str
    orientation: int


def probe(data: bytes, *, min_side: int, max_pixels: int, verify: str = "draft") -> Probe:
    """Size after EXIF orientation, format and integrity of image bytes; raises :class:`ReadError`.

    The header is read by the one decoder's :func:`shards.image.probe` (size, orientation, the
    policy's limits) without decoding. ``verify="draft"`` then decodes once (JPEGs at 1/8 scale
    through libjpeg's DCT scaling, which still reads the whole entropy stream) so that truncated
    files fail here rather than in a trainer's data loader months later; ``verify="full"`` decodes
    with :func:`shards.image.decode_image`, exactly as the stages and the trainer will.
    """
    policy = ReadPolicy(min_side=min_side, max_pixels=max_pixels, max_bytes=max(len(data or b""), 1))
    try:
        info = probe_header(data, policy)
    except ImageDecodeError as e:
        raise ReadError(str(e)) from e
    ext = FORMAT_EXT.get(info.format)
    if ext is None:
        raise ReadError(f"unsupported image format {info.format}; shards hold {sorted(FORMAT_EXT)} only")
    if verify != "header":
        _verify(data, verify, policy)
    return Probe(width=info.width, height=info.height, raw_width=info.raw_width, raw_height=info.raw_height,
                 ext=ext, orientation=info.orientation)


def _verify(data: bytes, mode: str, policy: ReadPolicy) -> None:
    try:
        if mode == "full":
            decode_image(data, policy)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
    except ImageDecodeError as e:
        raise ReadError(str(e)) from e
    except Exception as e:
        raise ReadError(f"cannot decode image ({type(e).__name__}: {e})") from e


class Source(ABC):
    """Base class of the sources: ``plan`` in the driver, ``materialize`` in the workers."""

    kind: ClassVar[str] = ""

    def __init__(self, name: str, images: str = "", **_: Any):
        self.name = name or self.kind
        # a local directory, or an s3:// / gs:// prefix kept as its URL (shards.storage reads it)
        self.images = (images.rstrip("/") if storage.is_remote(images) else Path(images)) if images else None

    def require_images_dir(self) -> Path | str:
        """``source.images`` as an existing directory, checked before anything is written."""
        if self.images is None:
            raise SourceError(f"a {self.kind} source needs source.images (--images, the image directory)")
        if not storage.isdir(self.images):
            raise SourceError(f"source.images (--images) {self.images} is not a directory")
        return self.images

    @abstractmethod
    def plan(self) -> Iterator[dict[str, str]]:
        """Validate the annotations and yield one planned item per input image (in the driver)."""

    @staticmethod  # noqa: B027 (deliberate no-op default: a folder has no annotations)
    def materialize(record: Record, ann: Any) -> None:
        """Turn the raw annotations of one image into record segments/boxes (in the worker)."""

    def rows(self, *, min_side: int = DEFAULT_POLICY.min_side, max_pixels: int = DEFAULT_POLICY.max_pixels,
             verify: str = "draft", max_bytes: int = DEFAULT_POLICY.max_bytes, follow_symlinks_outside: bool = False,
             exif: str = "reject") -> Iterator[dict[str, Any]]:
        """Plan and read locally: rows ``{key, image, record}`` (for tests and small jobs)."""
        for item in self.plan():
            yield read_item(item, min_side=min_side, max_pixels=max_pixels, verify=verify, max_bytes=max_bytes,
                            follow_symlinks_outside=follow_symlinks_outside, exif=exif)


def relative_name(file_name: str) -> str | None:
    """Why ``file_name`` cannot name a file under the image root, or None when it can.

    Checked lexically at planning time (no file system access): NUL bytes, absolute paths (POSIX or
    Windows drive), ``..`` components and empty names are refused. Symlinks are checked at read time.
    """
    if not file_name or "\0" in file_name:
        return "file_name is empty or holds a NUL byte"
    p = PurePosixPath(file_name.replace("\\", "/"))
    if p.is_absolute() or (len(file_name) > 1 and file_name[1] == ":"):
        return "file_name is an absolute path; it must be relative to --images"
    if ".." in p.parts:
        return "file_name leaves --images through '..'"
    return None


def item(key: str, path: str | None, record: Record, ann: Any = None, root: Path | str | None = None,
         ) -> dict[str, str]:
    """A planned item; ``path`` is relative to ``root`` (the image directory). ``ann`` is the raw
    per-image annotation payload, as an object or already as compact JSON text."""
    if path and record.failure is None:
        reason = relative_name(str(path))
        if reason is not None:
            record.fail("source", reason)
    text = ann if isinstance(ann, str) else json.dumps(ann, separators=(",", ":")) if ann is not None else ""
    ok = record.failure is None
    return {"key": key, "path": str(path) if path and ok else "", "root": str(root) if root and ok else "",
            "record": record_json(record), "ann": text if ok else ""}


def record_json(record: Record) -> str:
    """``record.to_json()``, the same text, several times faster: planning writes one per image in
    the driver, and ``dataclasses.asdict`` deep-copies every field first; json's ``default`` hook
    instead turns each nested dataclass into its fields (``vars``) as it goes."""
    return json.dumps(record, default=vars, separators=(",", ":"))


class EnvironmentReadError(ReadError):
    """The file is missing or not readable by this process: the environment's fault, retried on rerun."""


def read_file(root: str | Path, rel: str, *, max_bytes: int, follow_symlinks_outside: bool = False) -> bytes:
    """The bytes of ``root/rel``, refusing what is not a regular file inside ``root`` of at most ``max_bytes``.

    The file is opened with ``O_NONBLOCK`` (a FIFO without a writer would block ``open``) and checked
    with ``fstat`` on the open descriptor, so it is the same file that is read.
    """
    reason = relative_name(rel)
    if reason is not None:
        raise ReadError(reason)
    if storage.is_remote(root):
        return _read_object(str(root), rel, max_bytes)
    base = Path(root)
    path = base / rel
    real = Path(os.path.realpath(path))
    if not follow_symlinks_outside and not real.is_relative_to(os.path.realpath(base)):
        raise ReadError("resolves (through a symlink) outside --images; set read.follow_symlinks_outside=true "
                        "to allow it")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise EnvironmentReadError("image file not found") from e
    except PermissionError as e:
        raise EnvironmentReadError("cannot read the image file: permission denied") from e
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO or socket opened without a peer
            raise ReadError("not a regular file") from e
        raise EnvironmentReadError(f"cannot read the image file: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ReadError("not a regular file")
    if st.st_size > max_bytes:
        os.close(fd)
        raise ReadError(f"file is larger than read.max_bytes={max_bytes}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise EnvironmentReadError(f"cannot read the image file: {e.strerror}") from e
    if len(data) > max_bytes:  # grew after fstat
        raise ReadError(f"file is larger than read.max_bytes={max_bytes}")
    return data


def _read_object(root: str, rel: str, max_bytes: int) -> bytes:
    """:func:`read_file` on object storage: the key stays under the ``--images`` prefix, at most
    ``max_bytes`` are read; what the storage or the network refuses is retried by the next run."""
    try:
        return storage.read_under(root, rel, max_bytes)
    except FileNotFoundError as e:
        raise EnvironmentReadError("image file not found") from e
    except PermissionError as e:
        raise EnvironmentReadError("cannot read the image file: permission denied") from e
    except ValueError as e:
        raise ReadError(str(e)) from e
    except Exception as e:  # network, credentials, throttling: the environment's fault
        raise EnvironmentReadError(f"cannot read the image object ({type(e).__name__})") from e


def read_item(it: dict[str, Any], *, min_side: int, max_pixels: int, verify: str, max_bytes: int = 1 << 28,
              follow_symlinks_outside: bool = False, exif: str = "reject") -> dict[str, Any]:
    """One planned item to a pipeline row ``{key, image, record}``; never raises for a bad image.

    ``exif`` (``read.exif``): the decoder shows every image in its EXIF orientation, but annotation
    files (COCO, VG) are usually drawn on the stored pixels. A square image or a 180-degree rotation
    keeps its size, so a size check alone cannot see the mismatch and the masks would land on the
    wrong pixels. ``"reject"`` (default) therefore fails an annotated image whose orientation is not
    1 with a reason; ``"trust"`` says the annotations were drawn in the oriented frame (what a viewer
    shows) and uses them as they are.
    """
    from pipeline.sources import SOURCES  # the registry (materialize is looked up by kind)

    rec = Record.from_json(str(it["record"]))
    row = {"key": str(it["key"]), "image": b"", "record": ""}
    if rec.failure is not None:
        row["record"] = rec.to_json()
        return row
    rel = str(it["path"])
    name = rel or rec.file_name
    try:
        data = read_file(str(it.get("root") or ""), rel, max_bytes=max_bytes,
                         follow_symlinks_outside=follow_symlinks_outside)
        p = probe(data, min_side=min_side, max_pixels=max_pixels, verify=verify)
        if it.get("ann") and exif != "trust" and p.orientation not in (0, 1):
            raise ReadError(f"EXIF orientation {p.orientation} rotates or flips the image, and its annotations "
                            "are taken to be in the stored frame; set read.exif=trust if they were drawn on the "
                            "oriented image")
        _check_size(rec, p)
        rec.width, rec.height, rec.image_ext = p.width, p.height, p.ext
        row["image"] = data
    except EnvironmentReadError as e:
        rec.fail("read", f"{name}: {e}", retry=True)
    except ReadError as e:
        rec.fail("read", f"{name}: {e}")
    except Exception as e:  # anything else the read raises is this image's failure, never the task's
        rec.fail("read", f"{name}: {type(e).__name__} while reading")
    if rec.failure is None and it.get("ann"):
        try:
            ann = json.loads(str(it["ann"]))
            SOURCES[ann["kind"]].materialize(rec, ann)
        except Exception as e:
            rec.fail("source", f"bad annotation for {rec.image_id}: {type(e).__name__}: {e}")
    if rec.failure is not None:
        row["image"] = b""
    row["record"] = rec.to_json()
    return row


def _check_size(rec: Record, p: Probe) -> None:
    """Annotations are in the pixels of the annotated image: refuse a size that disagrees."""
    if not rec.width or not rec.height or (rec.width, rec.height) == (p.width, p.height):
        return
    if (rec.width, rec.height) == (p.raw_width, p.raw_height):
        raise ReadError(f"annotations are {rec.width}x{rec.height} (the stored pixels) but EXIF orientation "
                        f"{p.orientation} shows the image as {p.width}x{p.height}; they would not line up")
    raise ReadError(f"image is {p.width}x{p.height} but the annotation file says {rec.width}x{rec.height}")
