"""One decoder: for every awkward image kind, the pixels a pipeline stage gets (``decode_pending``) are
the pixels the trainer gets (``ShardSample.image()`` from a shard written by ``shards.ShardWriter``).

Before ``shards.image`` the shard reader did ``exif_transpose(...).convert("RGB")``: transparent
pixels came out as whatever colour hid under the alpha (black here) while the stages composited
them on white, and a 16-bit grey of 4000 was 255 for the trainer and 15 for the stages.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import shards
from pipeline.record import Record
from pipeline.sources import probe
from pipeline.stages.common import decode_pending
from shards.image import DEFAULT_POLICY, ReadPolicy, decode_rgb_array

W, H = 24, 20
WHITE = (255, 255, 255)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgba() -> bytes:
    im = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # fully transparent black
    im.paste((200, 30, 30, 255), (W // 2, 0, W, H))  # opaque red right half
    return _encode(im, "PNG")


def _la() -> bytes:
    im = Image.new("LA", (W, H), (0, 0))
    im.paste((100, 255), (W // 2, 0, W, H))
    return _encode(im, "PNG")


def _palette() -> bytes:
    im = Image.new("P", (W, H), 0)
    im.putpalette([0, 0, 0, 30, 200, 30] + [0] * 762)
    im.paste(1, (W // 2, 0, W, H))
    return _encode(im, "PNG", transparency=0)  # index 0 (black) is transparent


def _grey16() -> bytes:
    return _encode(Image.new("I;16", (W, H), 4000), "PNG")


def _cmyk() -> bytes:
    return _encode(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95)


def _grey() -> bytes:
    return _encode(Image.new("L", (W, H), 90), "PNG")


def _rotated() -> bytes:
    im = Image.new("RGB", (W, H), (20, 20, 20))
    im.paste((230, 230, 230), (0, 0, 6, 6))  # a mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return _encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def _tiny() -> bytes:
    return _encode(Image.new("RGB", (12, 12), (10, 120, 200)), "PNG")


KINDS = {"rgba": _rgba, "la": _la, "palette_transparent": _palette, "grey16": _grey16, "cmyk_jpeg": _cmyk,
         "grey": _grey, "exif_rotated": _rotated, "tiny_12x12": _tiny}
#: The job's read policy in this test: read.min_side=8 lets the 12x12 image in.
POLICY = ReadPolicy(min_side=8)


def _old_reader(data: bytes) -> np.ndarray:
    """What ``shards.reader.load_image`` did before the one decoder."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _stage_input(data: bytes) -> np.ndarray:
    records = [Record(source="t", image_id="0")]
    got = list(decode_pending({"image": np.array([data], dtype=object)}, records, "captioner", policy=POLICY))
    assert records[0].failure is None, records[0].failure
    assert len(got) == 1
    return np.asarray(got[0][1])


def _trainer_input(data: bytes, ext: str, tmp_path, width: int, height: int) -> np.ndarray:
    meta = shards.SampleMeta(key=shards.make_key("t", 0), image_id="0", source="t", width=width, height=height,
                             image_ext=ext, file_name=f"0.{ext}", captions=[shards.Caption("an image", "t")],
                             segments=[])
    with shards.ShardWriter(tmp_path, prefix="shard", max_samples=10) as writer:
        writer.write(meta, data)
    (sample,) = list(shards.iter_samples(tmp_path))
    return np.asarray(sample.image())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_stage_and_trainer_see_the_same_array(kind, tmp_path):
    data = KINDS[kind]()
    ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
    info = probe(data, min_side=POLICY.min_side, max_pixels=POLICY.max_pixels, verify="full")  # the read step
    stage = _stage_input(data)
    assert stage.dtype == np.uint8 and stage.shape == (info.height, info.width, 3)
    trainer = _trainer_input(data, ext, tmp_path, info.width, info.height)
    np.testing.assert_array_equal(stage, trainer)
    np.testing.assert_array_equal(stage, decode_rgb_array(data, POLICY))


def test_the_documented_choices():
    """Transparency on white, 16-bit scaled by bit depth, EXIF applied; the old reader disagreed."""
    for kind in ("rgba", "la", "palette_transparent"):
        data = KINDS[kind]()
        assert tuple(_stage_input(data)[0, 0]) == WHITE, kind
        assert tuple(_old_reader(data)[0, 0]) == (0, 0, 0), kind  # the trainer used to see black
    grey16 = KINDS["grey16"]()
    assert tuple(_stage_input(grey16)[0, 0]) == (4000 >> 8,) * 3
    assert tuple(_old_reader(grey16)[0, 0]) == WHITE  # PIL's convert clips 4000 to 255
    rotated = _stage_input(KINDS["exif_rotated"]())
    assert rotated.shape == (W, H, 3) and rotated[1, -2, 0] > 200 and rotated[1, 1, 0] < 60  # mark now top-right
    cmyk = _stage_input(KINDS["cmyk_jpeg"]())
    assert cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1] < 60  # C=0 M=Y=255: red
    assert tuple(decode_rgb_array(KINDS["rgba"](), ReadPolicy(background=(0, 0, 255)))[0, 0]) == (0, 0, 255)


def test_read_min_side_reaches_the_stages():
    """A 12x12 image accepted by read.min_side=8 is decoded by the stages under the job's policy (the
    stages used to apply their own min_side of 16 and fail it); the default policy still refuses it."""
    tiny = KINDS["tiny_12x12"]()
    assert _stage_input(tiny).shape == (12, 12, 3)
    records = [Record(source="t", image_id="0")]
    assert list(decode_pending({"image": np.array([tiny], dtype=object)}, records, "grounder",
                               policy=DEFAULT_POLICY)) == []
    assert records[0].failure.stage == "grounder" and "read.min_side=16" in records[0].failure.error


def test_the_job_hands_its_read_policy_to_every_model_stage():
    from pipeline.config import load_config

    cfg = load_config("pipeline/configs/demo.yaml", ["read.min_side=8", "read.max_pixels=123456"])
    assert cfg.read.policy() == ReadPolicy(min_side=8, max_pixels=123456, max_bytes=cfg.read.max_bytes)
    for name in ("captioner", "grounder", "segmenter"):
        assert "max_pixels" not in type(getattr(cfg, name)).model_fields  # no stage-level copy of the limits
