"""The one image decoder: bytes in, an EXIF-oriented 8-bit RGB image out, or one clear error.

Every reader of image bytes in the project goes through this module: the curation job's read step
(:func:`read_header`), every model stage (:func:`decode_image`), the shard reader
(``ShardSample.image()``), the validator, the trainer and evaluation. So the pixels SAM segmented
are the pixels the trainer learns from. Choices where formats leave room, fixed here once:

- **Formats**: JPEG, PNG and WebP only (what shards hold); other parsers are never reached.
- **EXIF orientation** (tag 274, values 2-8) is applied; ``width``/``height`` are after rotation.
  A corrupt EXIF block counts as orientation 1 (as browsers and ``ImageOps.exif_transpose`` do).
- **16-bit greyscale** (PNG ``I;16``) keeps its high byte: ``v >> 8``, so 65535 -> 255 and
  32768 -> 128 (PIL's own ``convert`` clips everything over 255 to white). 32-bit integer images
  keep their top 8 bits the same way; float images are clipped to [0, 255].
- **Transparency** (RGBA, LA, PA, palette or greyscale/RGB with a transparent colour) is composited
  onto ``ReadPolicy.background``, white by default, rather than dropped to whatever colour hides
  under the alpha. Shards are always read back with the default policy's background, so the job's
  read config does not expose it.
- **CMYK, YCbCr, palette, 1-bit, greyscale** go through PIL's conversion to RGB (it undoes Adobe's
  inverted CMYK JPEGs).
- **Limits** are checked from the header before any pixel is decoded: ``max_bytes`` of input,
  ``max_pixels`` (decompression bombs) and ``min_side`` (1x1 trackers, icons: nothing to segment).
  PIL's hard limit (2 x ``Image.MAX_IMAGE_PIXELS``, about 179 M pixels) still applies on top.
- Multi-frame files (animated PNG/WebP) give their first frame.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Decompression-bomb limit of the default policy: 16k x 16k pixels.
MAX_PIXELS = 16384 * 16384
#: Images with a side shorter than this are refused by the default policy.
MIN_SIDE = 16
#: Files larger than this are refused by the default policy (128 MiB).
MAX_BYTES = 128 << 20
#: The formats the decoder opens (PIL format names) and the shard image extension of each.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(ValueError):
    """The bytes are not a usable image under the policy; the message says why (one line)."""


class ReadPolicy(BaseModel):
    """What an image must be to be read, and the background transparency is composited onto.

    The curation job builds its policy from its ``read`` config section (``read.min_side``,
    ``read.max_pixels``, ``read.max_bytes``) and hands the same one to the read step and to every
    model stage; readers of finished shards use :data:`SHARD_POLICY` (no ``min_side``: the job
    already applied it, and a 12x12 image a job kept with ``read.min_side=8`` must read back).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_side: int = Field(MIN_SIDE, ge=1, description="images with a shorter side are refused")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="decompression-bomb limit in pixels (from the header)")
    max_bytes: int = Field(MAX_BYTES, ge=1, description="larger inputs are refused without being parsed")
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB that transparency is composited on")

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError(f"background must be an RGB triple of 0..255, got {v}")
        return v


DEFAULT_POLICY = ReadPolicy()
#: What shard readers (reader, validator, trainer) decode with: default conversion, any side.
SHARD_POLICY = ReadPolicy(min_side=1)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: size after EXIF orientation, stored size, format and orientation."""

    width: int
    height: int
    raw_width: int
    raw_height: int
    format: str  # PIL format name, a key of FORMAT_EXT
    orientation: int

    @property
    def ext(self) -> str:
        """The shard image extension of this format (``jpg``, ``png``, ``webp``)."""
        return FORMAT_EXT[self.format]


def open_image(data: bytes, policy: ReadPolicy = DEFAULT_POLICY) -> tuple[Image.Image, ImageHeader]:
    """Open (lazily: no pixel decoded) and check the header against the policy.

    Raises :class:`ImageDecodeError` for empty, oversized, unrecognised, too large or too small input.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    if len(data) > policy.max_bytes:
        raise ImageDecodeError(f"image data of {len(data)} bytes is over read.max_bytes={policy.max_bytes}")
    im = _open(bytes(data))
    w, h = im.size
    if w * h > policy.max_pixels:
        raise ImageDecodeError(f"image of {w}x{h} = {w * h} pixels is over the decompression-bomb limit "
                               f"read.max_pixels={policy.max_pixels}")
    orientation = _orientation(im)
    ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if min(ow, oh) < policy.min_side:
        raise ImageDecodeError(f"image of {ow}x{oh} is smaller than read.min_side={policy.min_side}")
    return im, ImageHeader(width=ow, height=oh, raw_width=w, raw_height=h, format=im.format, orientation=orientation)


def read_header(data: bytes, policy: ReadPolicy = DEFAULT_POLICY) -> ImageHeader:
    """The checked header of image bytes, without decoding pixels (see :func:`open_image`)."""
    return open_image(data, policy)[1]


probe = read_header  # the name the reader and validator use for the header check


def decode_image(data: bytes, policy: ReadPolicy = DEFAULT_POLICY) -> Image.Image:
    """Decode image bytes to a fully loaded, EXIF-oriented 8-bit RGB image.

    Raises :class:`ImageDecodeError` for anything the policy refuses and for truncated or corrupt data.
    """
    im, header = open_image(data, policy)
    try:
        im.load()
        method = _TRANSPOSE.get(header.orientation)
        if method is not None:
            im = im.transpose(method)
        return to_rgb(im, policy.background)
    except Exception as e:  # truncated data, unsupported mode: PIL raises many types
        raise ImageDecodeError(f"truncated or corrupt image: {type(e).__name__}: {e}") from None


def decode_rgb_array(data: bytes, policy: ReadPolicy = DEFAULT_POLICY) -> np.ndarray:
    """:func:`decode_image` as a ``[H, W, 3]`` uint8 array."""
    return np.asarray(decode_image(data, policy))


def to_rgb(im: Image.Image, background: tuple[int, int, int] = DEFAULT_POLICY.background) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docs for the choices)."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im)
        if mode == "F":
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            bits = 16 if mode.startswith("I;16") or arr.max(initial=0) < 65536 else 32
            arr8 = (np.clip(arr, 0, 2**bits - 1) >> (bits - 8)).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")  # the transparent index or colour becomes alpha 0
    elif mode == "P":
        im = im.convert("RGB")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def size_of(im: Image.Image) -> tuple[int, int]:
    """``(height, width)``: the order transformers' ``target_sizes``/``original_sizes`` use."""
    return im.size[1], im.size[0]


def _open(data: bytes) -> Image.Image:
    """``Image.open`` restricted to the shard formats; PIL's bomb warning is silenced (the policy's
    limit is checked right after), its hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) still applies."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(FORMAT_EXT))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image over the decompression-bomb limit: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image (unrecognised format, {len(data)} bytes; JPEG, PNG or WebP "
                               "expected)") from None
    except Exception as e:  # PIL raises SyntaxError, OSError, struct.error... on corrupt headers
        raise ImageDecodeError(f"corrupt image header: {type(e).__name__}: {e}") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a corrupt EXIF block is ignored, as browsers and PIL's exif_transpose do
        return 1
    return value if value in _TRANSPOSE else 1
