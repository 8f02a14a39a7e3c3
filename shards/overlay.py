"""PNG overlays of shard samples: each segment's mask, outline and texts drawn on its image.

This is how a person checks that a curation job produced what it claims: that masks sit on the
objects and that the texts describe them. Images are rescaled so that the shorter side is at least
``MIN_SIDE`` (tiny synthetic or thumbnail images stay legible) and the longer at most ``MAX_SIDE``;
fonts scale with the image. Every segment gets a distinct colour, a translucent fill, an outline
and a label with its id and first text on a dark box; a legend below lists every segment with all
of its texts, their sources and scores, and the image's captions (line breaks kept).

Labels sit beside their segments, never on a small mask or on any segment's anchor point, and never
on each other: in a crowded image they move out along rings around the anchor and a leader line in
the segment's colour joins each moved label to its mask (:func:`layout_labels`).
"""

from __future__ import annotations

import colorsys
import functools
import logging
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm import tqdm

from . import rle
from .reader import ShardSample, iter_samples
from .schema import Segment, is_valid_key

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
    """The inner band of a mask, ``width`` pixels wide (scipy's erosion, on the mask's box only)."""
    out = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return out
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = mask[box]
    # border_value=0: a mask touching the image edge gets its outline drawn along the edge too
    eroded = ndimage.binary_erosion(crop, structure=np.ones((2 * width + 1, 2 * width + 1), bool), border_value=0)
    out[box] = crop & ~eroded
    return out


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


@dataclass(frozen=True)
class Placement:
    """Where one label goes: its box, and the leader line from the box to its mask (None when the
    box already sits on the mask's anchor point)."""

    box: Box
    leader: tuple[tuple[int, int], tuple[int, int]] | None


def keep_out(mask: np.ndarray, anchor: tuple[int, int], label_area: int, margin: int) -> Box:
    """What no label may cover for a segment: the whole box of a small mask (smaller than a few
    labels: a label on it would hide it), else a square around its anchor point."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4 * label_area:
        return (int(xs.min()) - margin, int(ys.min()) - margin, int(xs.max()) + 1 + margin, int(ys.max()) + 1 + margin)
    x, y = anchor
    return (x - margin, y - margin, x + margin + 1, y + margin + 1)


def layout_labels(sizes: list[tuple[int, int]], anchors: list[tuple[int, int]], keep_outs: list[Box],
                  image_size: tuple[int, int]) -> list[Placement | None]:
    """Place label boxes of ``sizes`` (in this order: the first get the best spots) near their anchors.

    A box stays inside the image, overlaps no earlier box and covers no keep-out area (small masks,
    every anchor): labels never hide the objects they name. Spots are tried on rings of growing
    distance around the anchor; a box that is not on its anchor gets a leader line to it. None when
    no spot is free (the caller then shortens the label or drops the rule against overlaps). All
    candidate spots of a label are tested against all blockers at once (numpy), so hundreds of
    segments lay out in well under a second.
    """
    blockers = np.asarray(keep_outs, dtype=np.int64).reshape(-1, 4)
    out: list[Placement | None] = []
    for (w, h), anchor in zip(sizes, anchors, strict=True):
        boxes = _candidates(anchor, w, h, *image_size)
        free = ~_overlap_matrix(boxes, blockers).any(axis=1)
        if not free.any():
            out.append(None)
            continue
        spot = tuple(int(v) for v in boxes[int(np.argmax(free))])
        blockers = np.vstack([blockers, np.asarray(spot, dtype=np.int64)[None]])
        out.append(Placement(spot, _leader(spot, anchor)))
    return out


#: Directions tried around an anchor (16, from straight up, clockwise) and rings of distance.
_ANGLES = 2 * np.pi * np.arange(16) / 16 - np.pi / 2
_RINGS = 12


def _candidates(anchor: tuple[int, int], w: int, h: int, width: int, height: int) -> np.ndarray:
    """Boxes ``(N, 4)`` around ``anchor``: beside it first, then on rings further out, all inside the image."""
    if w > width or h > height:
        return np.zeros((0, 4), dtype=np.int64)
    gap = max(4, h // 2)
    radius = (gap + np.arange(_RINGS) * (h + gap))[:, None]  # (rings, 1)
    dx, dy = np.cos(_ANGLES)[None], np.sin(_ANGLES)[None]  # (1, angles)
    # the box edge nearest the anchor sits about ``radius`` away from it in each direction
    cx = anchor[0] + dx * (radius + w / 2 * np.sqrt(np.abs(dx)))
    cy = anchor[1] + dy * (radius + h / 2 * np.sqrt(np.abs(dy)))
    x0 = np.clip(cx - w / 2, 0, width - w).astype(np.int64).ravel()
    y0 = np.clip(cy - h / 2, 0, height - h).astype(np.int64).ravel()
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def _overlap_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[i, j]``: box ``a[i]`` overlaps box ``b[j]`` (boxes ``x0, y0, x1, y1``, end exclusive)."""
    return ((a[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < a[:, None, 2])
            & (a[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < a[:, None, 3]))


def _leader(box: Box, anchor: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The segment from the box edge point nearest the anchor to the anchor (None if inside)."""
    x0, y0, x1, y1 = box
    ax, ay = anchor
    near = (min(max(ax, x0), x1 - 1), min(max(ay, y0), y1 - 1))
    if near == (ax, ay):
        return None
    return near, (ax, ay)


def _draw_labels(img: Image.Image, segments: list[Segment], masks: dict[int, np.ndarray], order: list[int],
                 font: ImageFont.FreeTypeFont) -> list[Placement]:
    """Labels on dark boxes beside their segments, leader lines where they had to move away."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    pad = max(2, font.size // 4)
    swatch = font.size * 2 // 3
    todo = [i for i in reversed(order) if masks[i].any()]  # small segments first: theirs are the hard spots
    anchors = [_anchor(masks[i]) for i in todo]
    texts = [_label_text(segments[i]) for i in todo]

    def size(text: str) -> tuple[int, int]:
        return int(draw.textlength(text, font=font)) + 3 * pad + swatch, font.size + 2 * pad

    margin = max(2, font.size // 5)
    typical = size("00: a label")
    outs = [keep_out(masks[i], a, typical[0] * typical[1], margin) for i, a in zip(todo, anchors, strict=True)]
    placements = layout_labels([size(t) for t in texts], anchors, outs, img.size)
    for n, p in enumerate(placements):
        if p is None:  # no free spot for the full label: the id alone (the legend has the texts)
            texts[n] = str(segments[todo[n]].id)
    done = [p for p in placements if p is not None]
    retry = [n for n, p in enumerate(placements) if p is None]
    if retry:  # the ids, placed around the full labels already down; overlaps allowed as a last resort
        more = layout_labels([size(texts[n]) for n in retry], [anchors[n] for n in retry],
                             outs + [p.box for p in done], img.size)
        for n, p in zip(retry, more, strict=True):
            placements[n] = p or Placement(_clamp(anchors[n], size(texts[n]), img.size), None)
    for n, p in enumerate(placements):  # leader lines first: no line runs over a label
        if p.leader is not None:
            col = (*colour(todo[n]), 255)
            draw.line(p.leader, fill=col, width=2)
            ax, ay = anchors[n]
            draw.ellipse((ax - 2, ay - 2, ax + 2, ay + 2), fill=col)
    for n, p in enumerate(placements):
        col = (*colour(todo[n]), 255)
        x0, y0, x1, y1 = p.box
        draw.rounded_rectangle(p.box, radius=pad, fill=(0, 0, 0, 200), outline=col, width=2)
        draw.rectangle((x0 + pad, y0 + pad + 1, x0 + pad + swatch, y1 - pad - 1), fill=col)
        draw.text((x0 + 2 * pad + swatch, (y0 + y1) / 2), texts[n], font=font, fill=(255, 255, 255, 255), anchor="lm")
    img.alpha_composite(layer)
    return [p for p in placements if p is not None]


def _clamp(anchor: tuple[int, int], size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    w, h = size
    x0 = min(max(0, anchor[0] - w // 2), max(0, image_size[0] - w))
    y0 = min(max(0, anchor[1] - h // 2), max(0, image_size[1] - h))
    return x0, y0, x0 + w, y0 + h


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
        wrapped = [w for part in text.splitlines() or [""] for w in _wrap(measure, part, f, width - indent - pad)]
        for j, line in enumerate(wrapped):  # captions may hold line breaks (COCO 359219 does)
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
    """Write ``OUT/KEY.png`` for the first ``limit`` samples (all when None); returns the paths.

    Keys come from the shards, which may come from anyone: a key that is not a plain
    ``[A-Za-z0-9_-]`` name (``../x``, ``/etc/x``) would name a file elsewhere, so such a sample is
    skipped with a warning and nothing is written outside ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    root = out.resolve()
    for key, image in tqdm(iter_overlays(directory, limit), total=limit, unit="sample", disable=not progress,
                           desc="overlays"):
        path = out / f"{key}.png"
        if not is_valid_key(key) or path.resolve().parent != root:  # keys come from untrusted shards
            log.warning("skipping sample %r: its key is not a plain file name inside %s", key[:80], out)
            continue
        image.save(path, optimize=False)
        written.append(path)
    log.info("wrote %d overlays to %s", len(written), out)
    return written
