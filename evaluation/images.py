"""Reading benchmark images through the project's one decoder, and resizing for inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shards.image import decode_image


def read_rgb(path: str | Path) -> Image.Image:
    """The image file as 8-bit RGB through the project's one decoder (``shards.image``: EXIF orientation,
    read policy), so evaluation sees the pixels curation and training saw. Raises ``ValueError``
    (``ImageDecodeError``) or ``OSError`` naming the problem."""
    return decode_image(Path(path).read_bytes())


def inference_size(width: int, height: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge`` size rule: short side to ``short_side`` (0: keep), the long
    side capped at ``max_long_side``; returns ``(width, height)``."""
    if short_side <= 0:
        scale = 1.0
    else:
        scale = short_side / min(width, height)
    if max(width, height) * scale > max_long_side:
        scale = max_long_side / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map (PIL, 32-bit mode keeps every class id)."""
    if labels.shape == (height, width):
        return labels
    out = Image.fromarray(labels.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(out).astype(np.int32)
