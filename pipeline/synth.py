"""Deterministic synthetic dataset of coloured shapes, in standard formats.

It feeds the demo and the tests of every stage: COCO-format instances (polygons and RLE) and
captions for the pipeline, and the same images as an ADE20K-style semantic dataset for
evaluation. Each class is a distinct colour *and* shape ("red circle", "blue square"...), so a
segment embedding can learn it from a tiny random backbone, and captions are plain English that
spaCy parses into those noun phrases ("a red circle to the left of a blue square").

Layout written under ``OUT``::

    images/synth_000000.png ...            # RGB, sizes vary, never square
    instances.json                         # COCO instances (polygons; every third object as RLE)
    captions.json                          # COCO captions, two per image
    semantic/images/validation/*.jpg       # ADE20K SceneParsing layout
    semantic/annotations/validation/*.png  # uint8 labels, 0 = ignore (background), k = CLASSES[k-1]
    semantic/classes.json                  # the class names, index k-1 for label k
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeClass:
    colour: str
    shape: str
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


SHAPES: tuple[ShapeClass, ...] = (
    ShapeClass("red", "circle", (220, 30, 30)),
    ShapeClass("blue", "square", (30, 60, 220)),
    ShapeClass("green", "triangle", (30, 170, 50)),
    ShapeClass("yellow", "star", (240, 210, 20)),
    ShapeClass("purple", "diamond", (140, 40, 170)),
    ShapeClass("orange", "cross", (245, 130, 20)),
)
CLASSES: tuple[str, ...] = tuple(s.name for s in SHAPES)


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[float]:
    """The outline of a shape of radius ``r`` centred at (cx, cy), as a flat COCO polygon."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 32), math.sin(2 * math.pi * k / 32)) for k in range(32)]
    elif shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "diamond":
        pts = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    elif shape == "cross":
        a, b = 0.3, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    if shape in ("circle", "star", "cross"):
        c, s = 1.0, 0.0  # keep these upright: rotation adds nothing the model must learn
    out: list[float] = []
    for x, y in pts:
        out += [cx + r * (c * x - s * y), cy + r * (s * x + c * y)]
    return out


def _where(cx: float, ox: float) -> str:
    return "to the left of" if cx < ox else "to the right of"


def _place(rng: np.random.Generator, w: int, h: int, n: int) -> list[tuple[float, float, float]]:
    """Non-overlapping circles (cx, cy, r) that bound the shapes."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(200):
        if len(placed) == n:
            break
        r = rng.uniform(0.13, 0.22) * min(w, h)
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed


def generate(out: str | Path, n_images: int, seed: int = 0) -> Path:
    """Write the synthetic dataset to ``out`` (same ``seed`` and ``n_images`` give the same bytes)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sem_img = out / "semantic" / "images" / "validation"
    sem_ann = out / "semantic" / "annotations" / "validation"
    sem_img.mkdir(parents=True, exist_ok=True)
    sem_ann.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, captions = [], [], []
    for i in range(n_images):
        w, h = int(rng.integers(112, 192)), int(rng.integers(88, 150))
        if w == h:
            w += 8
        image_id, file_name = i + 1, f"synth_{i:06d}.png"
        pixels = (rng.normal(200, 12, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
        labels = np.zeros((h, w), dtype=np.uint8)
        n_obj = int(rng.integers(2, 5))
        classes = rng.choice(len(SHAPES), size=n_obj, replace=False)
        spots = _place(rng, w, h, n_obj)
        objs = []
        for cls, (cx, cy, r) in zip(classes, spots, strict=False):
            sc = SHAPES[int(cls)]
            # round first so that the stored polygon rasterises to exactly the painted mask
            poly = [round(v, 2) for v in _polygon(sc.shape, cx, cy, r, float(rng.uniform(0, math.pi / 4)))]
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            m = mask_utils.decode(rle).astype(bool)
            if m.sum() == 0:
                continue
            shade = np.clip(np.array(sc.rgb) + rng.normal(0, 8, size=(int(m.sum()), 3)), 0, 255)
            pixels[m] = shade.astype(np.uint8)
            labels[m] = int(cls) + 1
            ann_id = len(annotations) + 1
            as_rle = ann_id % 3 == 0
            segmentation = ({"size": [h, w], "counts": rle["counts"].decode("ascii")} if as_rle
                            else [poly])
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": int(cls) + 1, "iscrowd": 0,
                "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
            objs.append((sc.name, cx))
        Image.fromarray(pixels).save(out / "images" / file_name)
        Image.fromarray(pixels).save(sem_img / file_name.replace(".png", ".jpg"), quality=95)
        Image.fromarray(labels).save(sem_ann / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        names = [n for n, _ in objs]
        first = f"a {objs[0][0]} {_where(objs[0][1], objs[1][1])} a {objs[1][0]}." if len(objs) > 1 else f"a {names[0]}."
        listing = ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}" if len(names) > 1 else f"a {names[0]}"
        for text in (first.capitalize(), f"A grey picture with {listing}."):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    categories = [{"id": k + 1, "name": s.name, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    info = {"description": f"USE synthetic shapes, seed {seed}", "version": "1"}
    (out / "instances.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": annotations, "categories": categories}))
    (out / "captions.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": captions}))
    (out / "semantic" / "classes.json").write_text(json.dumps(list(CLASSES)))
    log.info("wrote %d images, %d objects to %s", len(images), len(annotations), out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--images", type=int, default=64, help="number of images (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    generate(args.out, args.images, args.seed)
    print(f"synthetic dataset: {args.images} images in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
