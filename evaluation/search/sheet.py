"""The hits of a query as files: ``hits.json`` and a contact sheet PNG.

Each tile is the hit's image cropped around its segment's box (with a margin, so the context shows),
the mask's outline drawn in a bright colour over it, and the rank, score and first text underneath.
Images are read from the shards by key, each shard once.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from shards import iter_samples, rle
from shards.overlay import load_font

from .query import Hit
from .store import atomic_write

log = logging.getLogger(__name__)

TILE = 200  # px, square crop area of a tile
CAPTION = 34  # px below each tile for rank/score and text
COLUMNS = 5
OUTLINE = (255, 214, 0)


def load_crops(hits: list[Hit], shards_dir: Path) -> dict[int, tuple[Image.Image, np.ndarray] | None]:
    """``rank -> (image, mask)`` for every hit found in its shard; None where the shard or sample is gone."""
    wanted: dict[str, dict[str, list[Hit]]] = {}
    for h in hits:
        wanted.setdefault(h.shard, {}).setdefault(h.key, []).append(h)
    out: dict[int, tuple[Image.Image, np.ndarray] | None] = {h.rank: None for h in hits}
    for shard, keys in wanted.items():
        tar = shards_dir / shard
        if not tar.is_file():
            log.warning("%s: shard not found; its hits have no picture", tar)
            continue
        for sample in iter_samples(tar, on_error="skip"):
            if sample.key not in keys:
                continue
            image = sample.image()
            segs = {s.id: s for s in sample.meta.segments}
            for h in keys[sample.key]:
                if h.segment_id in segs:
                    out[h.rank] = (image, rle.decode(segs[h.segment_id].rle))
    return out


def tile(image: Image.Image, mask: np.ndarray, bbox: list[float]) -> Image.Image:
    """The crop around ``bbox`` (25% margin, square, at least 32 px), scaled to TILE, mask outlined."""
    x, y, w, h = bbox
    side = max(32.0, max(w, h) * 1.25)
    cx, cy = x + w / 2, y + h / 2
    box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    crop = image.crop(box).resize((TILE, TILE), Image.Resampling.BILINEAR)
    m = Image.fromarray(mask.astype(np.uint8) * 255).crop(box).resize((TILE, TILE), Image.Resampling.NEAREST)
    inside = np.asarray(m) > 127
    edge = inside & ~ndimage.binary_erosion(inside, iterations=2, border_value=0)
    arr = np.asarray(crop.convert("RGB")).copy()
    arr[~inside] = (arr[~inside] * 0.55).astype(np.uint8)  # dim what is not the segment
    arr[edge] = OUTLINE
    return Image.fromarray(arr)


def contact_sheet(hits: list[Hit], shards_dir: Path, title: str = "") -> Image.Image:
    crops = load_crops(hits, shards_dir)
    cols = min(COLUMNS, max(1, len(hits)))
    rows = max(1, math.ceil(len(hits) / cols))
    head = 30 if title else 0
    sheet = Image.new("RGB", (cols * (TILE + 6) + 6, head + rows * (TILE + CAPTION + 6) + 6), (28, 28, 30))
    draw = ImageDraw.Draw(sheet)
    small, big = load_font(12), load_font(16)
    if title:
        draw.text((8, 6), title[:120], fill=(236, 236, 236), font=big)
    for i, h in enumerate(hits):
        x0 = 6 + (i % cols) * (TILE + 6)
        y0 = head + 6 + (i // cols) * (TILE + CAPTION + 6)
        got = crops.get(h.rank)
        if got is None:
            draw.rectangle((x0, y0, x0 + TILE - 1, y0 + TILE - 1), outline=(160, 160, 165))
            draw.text((x0 + 8, y0 + TILE // 2), "image not found", fill=(160, 160, 165), font=small)
        else:
            sheet.paste(tile(got[0], got[1], h.bbox), (x0, y0))
        text = h.texts[0]["text"] if h.texts else ""
        draw.text((x0 + 2, y0 + TILE + 2), f"#{h.rank}  {h.score:.3f}  {h.key}:{h.segment_id}"[:34],
                  fill=OUTLINE, font=small)
        draw.text((x0 + 2, y0 + TILE + 17), text[:32], fill=(236, 236, 236), font=small)
    return sheet


def write_hits(out: Path, query: dict[str, Any], hits: list[Hit], shards_dir: Path | None) -> dict[str, Path]:
    """``OUT/hits.json`` and, when the shards are at hand, ``OUT/contact_sheet.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"hits": out / "hits.json"}
    atomic_write(paths["hits"], json.dumps({"query": query, "hits": [h.to_json() for h in hits]}, indent=1).encode())
    if shards_dir is not None and hits:
        title = query.get("text") or f"like {query.get('segment')}"
        sheet = contact_sheet(hits, shards_dir, title=f"{title}  (top {len(hits)})")
        paths["sheet"] = out / "contact_sheet.png"
        tmp = out / ".contact_sheet.png.tmp"
        sheet.save(tmp, format="PNG", optimize=True)
        tmp.replace(paths["sheet"])
    return paths
