"""PNG overlays of shard samples: each segment's mask, outline and texts drawn on its image.

This is how a person checks that a curation job produced what it claims: that masks sit on the
objects and that the texts describe them. Images are rescaled so that the shorter side is at least
``MIN_SIDE`` (tiny synthetic or thumbnail images stay legible) and the longer at most ``MAX_SIDE``;
fonts scale with the image. Every segment gets a distinct colour, a translucent fill, an outline
and a label with its id and first text on a dark box; a legend below lists every segment with all
of its texts, their sources and scores, and the image's captions.
"""

from __future__ import annotations

import colorsys
import functools
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from . import rle
from .reader import ShardSample, iter_samples
from .schema import Segment

log = logging.getLogger(__name__)

MIN_SIDE = 512
MAX_SIDE = 1600
ALPHA = 0.35
LABEL_CHARS = 36
BACKGROUND = (28, 28, 30)
FOREGROUND = (236, 236, 236)
MUTED = (160, 160, 165)
# Saturated accent colours, ordered so that neighbours in the list differ in hue; golden-ratio hues
# beyond them. Dark colours are left out: an outline must show on dark and on bright objects.
PALETTE = [(255, 179, 0), (0, 200, 255), (255, 64, 129), (118, 255, 3), (170, 0, 255), (255, 109, 0),
           (0, 230, 118), (41, 121, 255), (255, 23, 68), (198, 255, 0), (213, 0, 249), (0, 229, 255),
           (255, 214, 0), (124, 77, 255), (29, 233, 182), (255, 145, 128)]

Box = tuple[int, int, int, int]


def colour(i: int) -> tuple[int, int, int]:
    """The i-th segment colour: distinct for the first 16, well spread after that."""
    if i < len(PALETTE):
        return PALETTE[i]
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@functools.cache
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans when installed (wide Unicode coverage for real captions), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def scale_for(width: int, height: int) -> float:
    """The factor an image of this size is drawn at (small images up, huge images down)."""
    if min(width, height) < MIN_SIDE:
        return MIN_SIDE / min(width, height)
    if max(width, height) > MAX_SIDE:
        return MAX_SIDE / max(width, height)
    return 1.0


def overlay_size(width: int, height: int) -> tuple[int, int]:
    """The size of the image part of an overlay (the legend is added below it)."""
    s = scale_for(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def scaled_image(sample: ShardSample) -> Image.Image:
    """The sample's image at overlay size: pixels repeated when enlarged, so that each mask edge
    falls on the image's own pixel edges (no blur or ringing to misjudge a mask by)."""
    image = sample.image()
    size = overlay_size(*image.size)
    if size == image.size:
        return image
    up = size[0] > image.size[0]
    return image.resize(size, Image.Resampling.NEAREST if up else Image.Resampling.LANCZOS)


def render(sample: ShardSample) -> Image.Image:
    """The overlay of one sample: the annotated image on top, its legend below."""
    base = scaled_image(sample)
    size = base.size
    canvas = np.asarray(base, dtype=np.float32)
    label_font = load_font(max(13, round(min(size) / 30)))
    order = sorted(range(len(sample.meta.segments)), key=lambda i: -sample.meta.segments[i].area)
    masks: dict[int, np.ndarray] = {}
    for i in order:  # large segments first, so that small ones stay visible on top
        seg = sample.meta.segments[i]
        mask = _scaled_mask(seg, size)
        masks[i] = mask
        col = np.asarray(colour(i), dtype=np.float32)
        canvas[mask] = canvas[mask] * (1 - ALPHA) + col * ALPHA
        canvas[_outline(mask, max(1, round(min(size) / 170)))] = col
    out = Image.fromarray(canvas.round().astype(np.uint8)).convert("RGBA")
    _draw_labels(out, sample.meta.segments, masks, order, label_font)
    legend = _legend(sample, size[0], label_font)
    result = Image.new("RGB", (size[0], size[1] + legend.height), BACKGROUND)
    result.paste(out.convert("RGB"), (0, 0))
    result.paste(legend, (0, size[1]))
    return result


def _scaled_mask(seg: Segment, size: tuple[int, int]) -> np.ndarray:
    mask = Image.fromarray(rle.decode(seg.rle).astype(np.uint8) * 255)
    return np.asarray(mask.resize(size, Image.Resampling.NEAREST)) > 127


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner band of a mask, ``width`` pixels wide."""
    eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1))
    return mask & (np.asarray(eroded) < 128)


def _anchor(mask: np.ndarray) -> tuple[int, int] | None:
    """A point inside the mask near its centroid (the centroid itself may fall outside)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    cx, cy = xs.mean(), ys.mean()
    k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return int(xs[k]), int(ys[k])


def _label_text(seg: Segment) -> str:
    text = textwrap.shorten(seg.texts[0].text, LABEL_CHARS, placeholder="…") if seg.texts else ""
    more = f"  +{len(seg.texts) - 1}" if len(seg.texts) > 1 else ""
    return f"{seg.id}: {text}{more}"


def _draw_labels(img: Image.Image, segments: list[Segment], masks: dict[int, np.ndarray], order: list[int],
                 font: ImageFont.FreeTypeFont) -> None:
    """Labels on dark boxes at each segment, moved up or down to avoid earlier labels."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    placed: list[Box] = []
    pad = max(2, font.size // 4)
    swatch = font.size * 2 // 3
    for i in reversed(order):  # small segments get the best spots: their label is harder to place
        anchor = _anchor(masks[i])
        if anchor is None:
            continue
        text = _label_text(segments[i])
        box = _place(draw, text, font, anchor, img.size, placed, pad, swatch)
        if box is None:  # no free spot for the full label: the id alone (the legend has the texts)
            text = str(segments[i].id)
            box = _place(draw, text, font, anchor, img.size, placed, pad, swatch)
        if box is None:  # still none: the id at the segment, over other labels
            box = _place(draw, text, font, anchor, img.size, [], pad, swatch)
        placed.append(box)
        x0, y0, x1, y1 = box
        draw.rounded_rectangle(box, radius=pad, fill=(0, 0, 0, 200), outline=(*colour(i), 255), width=2)
        draw.rectangle((x0 + pad, y0 + pad + 1, x0 + pad + swatch, y1 - pad - 1), fill=(*colour(i), 255))
        draw.text((x0 + 2 * pad + swatch, (y0 + y1) / 2), text, font=font, fill=(255, 255, 255, 255), anchor="lm")
    img.alpha_composite(layer)


def _place(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, anchor: tuple[int, int],
           size: tuple[int, int], placed: list[Box], pad: int, swatch: int) -> Box | None:
    """A label box near ``anchor``, inside the image, overlapping no placed box (None if impossible)."""
    w = int(draw.textlength(text, font=font)) + 3 * pad + swatch
    h = font.size + 2 * pad
    for step in (0, 1, -1, 2, -2, 3, -3):
        for shift in (0, -1, 1):  # centred on the anchor, then ending or starting at it
            x0 = min(max(0, anchor[0] - w // 2 + shift * w // 2), max(0, size[0] - w))
            y0 = min(max(0, anchor[1] - h // 2 + step * (h + 2)), max(0, size[1] - h))
            box = (x0, y0, x0 + w, y0 + h)
            if not any(_overlaps(box, other) for other in placed):
                return box
    return None


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _legend(sample: ShardSample, width: int, big: ImageFont.FreeTypeFont) -> Image.Image:
    """A strip listing the image (key, source, size), its captions and every segment's texts."""
    small = load_font(max(12, round(big.size * 0.85)))
    meta = sample.meta
    pad = big.size // 2
    swatch = big.size
    lines: list[tuple[str, ImageFont.FreeTypeFont, tuple[int, int, int], int, int | None]] = []  # + indent, swatch
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def add(text: str, f: ImageFont.FreeTypeFont, fill: tuple[int, int, int], indent: int,
            swatch_of: int | None = None) -> None:
        for j, line in enumerate(_wrap(measure, text, f, width - indent - pad)):
            lines.append((line, f, fill, indent, swatch_of if j == 0 else None))

    add(f"{sample.key}  ·  {meta.source}  ·  {meta.width}x{meta.height}  ·  {len(meta.segments)} segments",
        big, FOREGROUND, pad)
    for c in meta.captions:
        add(f"caption ({c.source}): {c.text}", small, MUTED, pad)
    for i, seg in enumerate(meta.segments):
        add(f"{seg.id}  area {seg.area}  mask score {seg.score:.2f}", big, FOREGROUND, 2 * pad + swatch, i)
        for t in seg.texts:
            add(f"• {t.text}  ({t.source}, {t.score:.2f})", small, MUTED, 3 * pad + swatch)
    heights = [int(f.size * 1.35) for _, f, *_ in lines]
    strip = Image.new("RGB", (width, sum(heights) + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    y = pad
    for (text, f, fill, indent, swatch_of), h in zip(lines, heights, strict=True):
        if swatch_of is not None:
            draw.rectangle((pad, y + (h - swatch) // 2, pad + swatch, y + (h + swatch) // 2),
                           fill=colour(swatch_of), outline=FOREGROUND)
        draw.text((indent, y + h // 2), text, font=f, fill=fill, anchor="lm")
        y += h
    return strip


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (a single over-long word is cut rather than overflowing)."""
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return [_cut(draw, line, font, width) for line in lines]


def _cut(draw: ImageDraw.ImageDraw, line: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    while len(line) > 1 and draw.textlength(line, font=font) > width:
        line = line[:-2] + "…"
    return line


def iter_overlays(directory: str | Path, limit: int | None = None) -> Iterator[tuple[str, Image.Image]]:
    """``(key, overlay)`` for the first ``limit`` samples of a shard directory, in file order."""
    for n, sample in enumerate(iter_samples(directory, on_error="skip")):
        if limit is not None and n >= limit:
            return
        yield sample.key, render(sample)


def inspect(directory: str | Path, out: str | Path, limit: int | None = None, progress: bool = False) -> list[Path]:
    """Write ``OUT/KEY.png`` for the first ``limit`` samples (all when None); returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, image in tqdm(iter_overlays(directory, limit), total=limit, unit="sample", disable=not progress,
                           desc="overlays"):
        path = out / f"{key}.png"
        image.save(path, optimize=False)
        written.append(path)
    log.info("wrote %d overlays to %s", len(written), out)
    return written
