"""``image | ground truth | prediction`` side by side, with a legend of the classes present.

Class ``k`` always has the same colour (``shards.overlay.colour(k)``, the shard overlays' palette),
ignore pixels are black, and the legend lists every class in the ground truth or the prediction with
its pixel share in each. Panels are scaled so the long side is at most 640 pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards.overlay import BACKGROUND, FOREGROUND, colour, load_font

from .datasets import IGNORE

PANEL_MAX = 640
ALPHA = 0.55


def colourise(labels: np.ndarray, num_classes: int) -> np.ndarray:
    lut = np.array([colour(k) for k in range(num_classes)] + [(0, 0, 0)], dtype=np.uint8)
    return lut[np.where(labels == IGNORE, num_classes, labels)]


def render(image: Image.Image, gt: np.ndarray, pred: np.ndarray, names: list[str] | tuple[str, ...]) -> Image.Image:
    k = len(names)
    scale = min(1.0, PANEL_MAX / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    panels = [base.astype(np.uint8)]
    for labels in (gt, pred):
        small = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
        panels.append((base * (1 - ALPHA) + colourise(small, k) * ALPHA).astype(np.uint8))
    font = load_font(14)
    present = sorted(set(np.unique(gt[gt != IGNORE]).tolist()) | set(np.unique(pred).tolist()))
    gt_n, pred_n = max(1, int((gt != IGNORE).sum())), max(1, pred.size)
    line, cols = 20, 3
    col_w = (3 * size[0] + 8) // cols
    rows = -(-len(present) // cols)
    canvas = Image.new("RGB", (3 * size[0] + 8, size[1] + 24 + rows * line + 8), BACKGROUND)
    for i, p in enumerate(panels):
        canvas.paste(Image.fromarray(p), (i * (size[0] + 4), 24))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((i * (size[0] + 4) + 4, 4), title, fill=FOREGROUND, font=font)
    for j, c in enumerate(present):
        x, y = (j % cols) * col_w + 4, size[1] + 28 + (j // cols) * line
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=colour(c))
        share = f"{100 * (gt == c).sum() / gt_n:.0f}% / {100 * (pred == c).sum() / pred_n:.0f}%"
        draw.text((x + 18, y), f"{names[c].split(',')[0][:28]}  {share}", fill=FOREGROUND, font=font)
    return canvas


def save_overlay(path: Path, image: Image.Image, gt: np.ndarray, pred: np.ndarray, names) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render(image, gt, pred, names).save(path)
    return path
