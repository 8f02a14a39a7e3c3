"""Defensive image decoding: bytes in, an EXIF-oriented 8-bit RGB ``PIL.Image`` out, or one clear error.

Every stage that needs pixels decodes ``batch["image"]`` with :func:`decode`, so all of them see the
same pixels (the shard keeps the original bytes). Choices where formats leave room:

- EXIF orientation is applied (``ImageOps.exif_transpose``): boxes and masks are in the pixels a
  viewer shows, and ``width``/``height`` in the shard are those after rotation.
- 16-bit and 32-bit integer greyscale is scaled to 8 bits by its bit depth (PIL's own ``convert``
  clips everything over 255 to white); float images are clipped to [0, 255].
- Transparency (RGBA, LA, palette with a transparent index) is composited onto white, the usual
  page background, rather than dropped to whatever colour hides under the alpha.
- CMYK and YCbCr go through PIL's conversion (it undoes Adobe's inverted CMYK JPEGs).
- The decompression-bomb limit is checked from the header before any pixel is decoded; images with
  a side under ``min_side`` (1x1 trackers, icons) are rejected: nothing can be segmented in them.
- Multi-frame files (GIF, TIFF) give their first frame.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Pixel limit against decompression bombs (~ 16k x 16k); a larger image fails with a clear error.
MAX_PIXELS = 16384 * 16384
#: Images with a side shorter than this are rejected.
MIN_SIDE = 16


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why (it ends up in the failure table)."""


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> Image.Image:
    """Decode image bytes to an EXIF-transposed, fully loaded RGB image.

    Raises :class:`ImageDecodeError` for empty, truncated, non-image, too large or too small input.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 M pixels; the limit here is ``max_pixels``, checked just below, the same
            # one ``pipeline.sources.probe`` applies at read time (so no stage rejects what the read kept).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as e:  # PIL's hard limit, 2 x 89 M pixels
        raise ImageDecodeError(f"image over the decompression-bomb limit: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image (unrecognised format, {len(data)} bytes)") from None
    except Exception as e:  # PIL raises many types for corrupt headers
        raise ImageDecodeError(f"corrupt image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"image of {w}x{h} = {w * h} pixels is over the decompression-bomb limit of {max_pixels} pixels")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        rgb = to_rgb(im)
    except ImageDecodeError:
        raise
    except Exception as e:  # truncated data, broken EXIF, unsupported mode
        raise ImageDecodeError(f"truncated or corrupt image: {type(e).__name__}: {e}") from None
    if min(rgb.size) < min_side:
        raise ImageDecodeError(f"image of {rgb.size[0]}x{rgb.size[1]} is too small (minimum side {min_side})")
    return rgb


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docs for the choices)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im)
        if mode == "F":
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            bits = 16 if mode.startswith("I;16") or arr.max(initial=0) < 65536 else 32
            arr8 = (np.clip(arr, 0, 2**bits - 1) >> (bits - 8)).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def size_of(im: Image.Image) -> tuple[int, int]:
    """``(height, width)`` — the order transformers' ``target_sizes``/``original_sizes`` use."""
    return im.size[1], im.size[0]
