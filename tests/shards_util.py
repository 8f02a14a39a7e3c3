"""Tiny shard samples drawn on the fly for the shard tests (rectangles and discs with known masks)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

import shards
from shards import rle

COLOURS = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (230, 200, 30)]


def make_masks(width: int, height: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` boolean masks (alternating rectangles and discs) that never cover the whole image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x1, y1 = x0 + rng.integers(3, width // 2), y0 + rng.integers(3, height // 2)
        if i % 2:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(2, min(x1 - x0, y1 - y0) / 2)
            masks[i] = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        else:
            masks[i, y0:y1, x0:x1] = True
    return masks


def draw_image(masks: np.ndarray, fmt: str = "png") -> bytes:
    """An image with each mask painted in its own colour on grey, encoded as ``fmt``."""
    _, h, w = masks.shape
    pixels = np.full((h, w, 3), 128, dtype=np.uint8)
    for i, m in enumerate(masks):
        pixels[m] = COLOURS[i % len(COLOURS)]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


def make_sample(index: int, width: int = 40, height: int = 30, n_segments: int = 3,
                fmt: str = "png") -> tuple[shards.SampleMeta, bytes, np.ndarray]:
    """A valid sample: metadata whose RLEs, boxes and areas come from the drawn masks."""
    masks = make_masks(width, height, n_segments, seed=index)
    rles = rle.encode(masks)
    areas, boxes = rle.area(rles), rle.bbox(rles)
    segments = [
        shards.Segment(id=k, rle=r, bbox=[float(v) for v in boxes[k]], area=int(areas[k]),
                       texts=[shards.Text(f"shape {k} of image {index}", "synth", 1.0),
                              shards.Text(f"thing {k}", "caption:synth", 0.5)], score=0.9)
        for k, r in enumerate(rles)
    ]
    meta = shards.SampleMeta(
        key=shards.make_key("test", index), image_id=str(index), source="test", width=width, height=height,
        image_ext=fmt, file_name=f"{index}.{fmt}", captions=[shards.Caption(f"image {index}", "test")],
        segments=segments)
    return meta, draw_image(masks, fmt), masks


def write_dataset(out: Path, n: int, max_samples: int = 2, prefix: str = "shard") -> dict[str, np.ndarray]:
    """Write ``n`` samples with :class:`shards.ShardWriter`; returns each key's masks."""
    masks_by_key = {}
    with shards.ShardWriter(out, prefix=prefix, max_samples=max_samples) as writer:
        for i in range(n):
            meta, image, masks = make_sample(i)
            writer.write(meta, image)
            masks_by_key[meta.key] = masks
    return masks_by_key


def sample_members(meta: shards.SampleMeta | dict, image: bytes, ext: str = "png") -> list[tuple[str, bytes]]:
    """The members the writer would write for a sample, from a (possibly broken) JSON dict."""
    d = meta.to_dict() if isinstance(meta, shards.SampleMeta) else meta
    return [(f"{d['key']}.json", json.dumps(d).encode()), (f"{d['key']}.{ext}", image)]


def write_tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    """A tar with exactly these member names (no sanitising, unlike ``tarfile.add``)."""
    with tarfile.open(path, "w") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
