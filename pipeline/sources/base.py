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
"""

from __future__ import annotations

import io
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, UnidentifiedImageError

from pipeline.record import Record

#: PIL format name -> the shard image extension (shards hold original bytes of these only).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
#: EXIF orientations that swap width and height (transpose / rotate 90 / transverse / rotate 270).
_SWAPS = {5, 6, 7, 8}
_ORIENTATION = 0x0112


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

    The header gives size and orientation without decoding. ``verify="draft"`` then decodes once
    (JPEGs at 1/8 scale through libjpeg's DCT scaling, which still reads the whole entropy stream)
    so that truncated files fail here rather than in a trainer's data loader months later.
    """
    if not data:
        raise ReadError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ReadError(f"over the decompression-bomb limit: {e}") from e
        except UnidentifiedImageError as e:
            raise ReadError(f"not an image (unrecognised format, {len(data)} bytes)") from e
        except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError...
            raise ReadError(f"not a readable image ({type(e).__name__}: {e})") from e
        with img:
            ext = FORMAT_EXT.get(img.format or "")
            if ext is None:
                raise ReadError(f"unsupported image format {img.format}; shards hold {sorted(FORMAT_EXT)} only")
            w, h = img.size
            if w * h > max_pixels:
                raise ReadError(f"image is {w}x{h} = {w * h} pixels, over the decompression-bomb limit "
                                f"read.max_pixels={max_pixels}")
            try:
                orientation = int(img.getexif().get(_ORIENTATION, 1) or 1)
            except Exception:  # a corrupt EXIF block is ignored, as browsers and PIL's exif_transpose do
                orientation = 1
            ow, oh = (h, w) if orientation in _SWAPS else (w, h)
            if min(ow, oh) < min_side:
                raise ReadError(f"image is {ow}x{oh}, smaller than read.min_side={min_side}")
            if verify != "header":
                _verify(img, data, verify, min_side, max_pixels)
    return Probe(width=ow, height=oh, raw_width=w, raw_height=h, ext=ext, orientation=orientation)


def _verify(img: Image.Image, data: bytes, mode: str, min_side: int, max_pixels: int) -> None:
    try:
        if mode == "full":
            from pipeline.images import decode  # the project's defensive decoder, as the stages use it

            decode(data, max_pixels=max_pixels, min_side=min_side)
            return
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        img.load()
    except ReadError:
        raise
    except Exception as e:
        raise ReadError(f"cannot decode image ({type(e).__name__}: {e})") from e


class Source(ABC):
    """Base class of the sources: ``plan`` in the driver, ``materialize`` in the workers."""

    kind: ClassVar[str] = ""

    def __init__(self, name: str, images: str = "", **_: Any):
        self.name = name or self.kind
        self.images = Path(images) if images else None

    @abstractmethod
    def plan(self) -> Iterator[dict[str, str]]:
        """Validate the annotations and yield one planned item per input image (in the driver)."""

    @staticmethod  # noqa: B027 (deliberate no-op default: a folder has no annotations)
    def materialize(record: Record, ann: Any) -> None:
        """Turn the raw annotations of one image into record segments/boxes (in the worker)."""

    def rows(self, *, min_side: int = 8, max_pixels: int = 178_956_970, verify: str = "draft",
             ) -> Iterator[dict[str, Any]]:
        """Plan and read locally: rows ``{key, image, record}`` (for tests and small jobs)."""
        for item in self.plan():
            yield read_item(item, min_side=min_side, max_pixels=max_pixels, verify=verify)


def item(key: str, path: Path | str | None, record: Record, ann: Any = None) -> dict[str, str]:
    return {"key": key, "path": str(path) if path else "", "record": record.to_json(),
            "ann": json.dumps(ann, separators=(",", ":")) if ann is not None else ""}


def read_item(it: dict[str, Any], *, min_side: int, max_pixels: int, verify: str) -> dict[str, Any]:
    """One planned item to a pipeline row ``{key, image, record}``; never raises for a bad image."""
    from pipeline.sources import SOURCES  # the registry (materialize is looked up by kind)

    rec = Record.from_json(str(it["record"]))
    row = {"key": str(it["key"]), "image": b"", "record": ""}
    if rec.failure is not None:
        row["record"] = rec.to_json()
        return row
    path = Path(str(it["path"]))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        rec.fail("read", f"image file not found: {path}")
    except OSError as e:
        rec.fail("read", f"cannot read {path}: {e}")
    else:
        try:
            p = probe(data, min_side=min_side, max_pixels=max_pixels, verify=verify)
            _check_size(rec, p)
            rec.width, rec.height, rec.image_ext = p.width, p.height, p.ext
            row["image"] = data
        except ReadError as e:
            rec.fail("read", f"{path.name}: {e}")
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
