"""shards.image.decode_image (the one decoder): every bad-input kind either decodes to sane RGB or fails with a clear error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shards.image import ImageDecodeError, ReadPolicy, size_of
from shards.image import decode_image as decode


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb needs no pixel data to fail)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_plain_jpeg_decodes_to_rgb():
    im = decode(_save(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG"))
    assert im.mode == "RGB" and im.size == (40, 30) and size_of(im) == (30, 40)


def test_zero_bytes():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode(b"")


def test_truncated_jpeg():
    data = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode(data[: len(data) // 2])


def test_non_image_bytes():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode(b"%PDF-1.4 this is not an image at all" * 10)


def test_cmyk_jpeg_becomes_rgb():
    data = _save(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    im = decode(data)
    assert im.mode == "RGB" and im.size == (32, 24)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped():
    arr = np.full((20, 30), 32768, dtype=np.uint16)
    arr[:, :10] = 65535
    data = _save(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode(data))
    assert out.shape == (20, 30, 3)
    assert (out[:, :10] == 255).all() and (out[:, 10:] == 128).all()  # PIL's convert would make both 255


def test_palette_png_with_and_without_transparency():
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (np.asarray(decode(_save(pal, "PNG"))) == [10, 200, 30]).all()
    transparent = _save(pal, "PNG", transparency=1)
    assert (np.asarray(decode(transparent)) == 255).all()  # the transparent colour composites onto white


def test_rgba_composited_on_white():
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 10, 20))
    out = np.asarray(decode(_save(im, "PNG")))
    assert (out[:, :10] == [0, 0, 255]).all() and (out[:, 10:] == 255).all()


def test_exif_orientation_6_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 8, 4))  # a red mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    im = decode(_save(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert im.size == (20, 40)  # width and height swapped
    arr = np.asarray(im).astype(int)
    assert arr[1, 18, 0] > 200 and arr[1, 1, 0] < 60  # the mark is now at the top-right


def test_one_by_one_image_is_too_small():
    with pytest.raises(ImageDecodeError, match="smaller than read.min_side=16"):
        decode(_save(Image.new("RGB", (1, 1)), "PNG"))


def test_decompression_bomb_from_header():
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode(_png_header_only(100_000, 100_000))


def test_decompression_bomb_limit_is_a_parameter():
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="10000 pixels is over the decompression-bomb limit read.max_pixels=5000"):
        decode(data, ReadPolicy(max_pixels=5000))
    assert decode(data, ReadPolicy(max_pixels=10_000)).size == (100, 100)


def test_read_and_decode_apply_the_same_pixel_limit(monkeypatch):
    """An image between PIL's warning threshold and ``max_pixels`` passes the read's probe, so every
    model stage must decode it too (PIL's warning is not a second, stricter limit)."""
    from pipeline.sources import probe

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 px, refuses above 2000
    data = _save(Image.new("RGB", (40, 40), (10, 200, 30)), "PNG")  # 1600 px: warned, not refused
    assert probe(data, min_side=8, max_pixels=10_000).width == 40
    assert decode(data, ReadPolicy(max_pixels=10_000)).size == (40, 40)
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode(_save(Image.new("RGB", (50, 50)), "PNG"), ReadPolicy(max_pixels=10_000))  # 2500 px: PIL's hard limit
