"""The benchmarks: where each one's images and labels live and how its labels are encoded.

Layouts and encodings are those of the CAT-Seg / SED preparation scripts (``datasets/prepare_*.py``
and ``cat_seg/data/datasets/register_*.py`` of github.com/cvlab-kaist/CAT-Seg; SED's are the same
files), which the published open-vocabulary figures were measured on:

============  =======================================  ========================================  ==================
dataset       images                                   labels                                    encoding
============  =======================================  ========================================  ==================
ade20k-150    ADEChallengeData2016/images/validation   annotations_detectron2/validation *.png   uint8 0..149, 255 ignore
              (or the raw release)                     annotations/validation *.png              uint8 1..150, 0 ignore
ade20k-847    ADE20K_2021_17_01/images_detectron2/     annotations_detectron2/validation *.tif   uint16 0..846, 65535 ignore
              validation
pc-59         VOCdevkit/VOC2010/JPEGImages             annotations_detectron2/pc59_val *.png     uint8 0..58, 255 ignore
pc-459        VOCdevkit/VOC2010/JPEGImages             annotations_detectron2/pc459_val *.tif    uint16 0..458, 65535 ignore
voc-20        VOCdevkit/VOC2012/JPEGImages             annotations_detectron2/val *.png          uint8 0..19, 255 ignore
synth         semantic/images/validation               semantic/annotations/validation *.png     uint8 1..K, 0 ignore
============  =======================================  ========================================  ==================

PC-459: CAT-Seg registers ``ignore_label=459`` because ``LabelMap - 1`` has no ignore value at all;
65535 is used here defensively (a value no class has), and "unknown" is one of the 459 classes.
``--root`` may be the dataset folder itself or a folder holding it (detectron2's
``DETECTRON2_DATASETS``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..classes import ClassList, load_class_file, plain_class_list
from .base import DatasetError, LabelEncoding, SemSegDataset, pair_files

UINT8_255 = LabelEncoding("uint8", ignore=255)
UINT8_SCENEPARSING = LabelEncoding("uint8", ignore=0, offset=1)
UINT16_TIFF = LabelEncoding("uint16", ignore=65535, suffix=".tif")


@dataclass(frozen=True)
class Form:
    """One accepted layout of a dataset: folders relative to the dataset root, and the label encoding."""

    name: str
    images: str
    labels: str
    encoding: LabelEncoding


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str                                   # the dataset root's usual name (for parent-folder roots)
    forms: tuple[Form, ...]                       # tried in order
    class_file: str | None
    prepare: str                                  # the command that builds the layout
    expected_count: int | None = None             # validation images of the full benchmark
    class_loader: Callable[[Path], ClassList] | None = None

    def layout(self) -> str:
        return "; or ".join(f"{self.folder}/{{{f.images}/*.jpg, {f.labels}/*{f.encoding.suffix}}}" for f in self.forms)


def _synth_classes(root: Path) -> ClassList:
    path = root / "classes.json"
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"synth: cannot read the class list {path} ({e}); "
                           "make the dataset with: python -m pipeline synth --out DIR") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise DatasetError(f"synth: {path} must be a JSON list of class names")
    return plain_class_list(names, f"{path}")


SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("ade20k-150", "ADEChallengeData2016",
                (Form("detectron2", "images/validation", "annotations_detectron2/validation", UINT8_255),
                 Form("sceneparsing", "images/validation", "annotations/validation", UINT8_SCENEPARSING)),
                "ade150.json", "python -m evaluation prepare ade20k-150 --src ADEChallengeData2016", 2000),
    DatasetSpec("ade20k-847", "ADE20K_2021_17_01",
                (Form("detectron2", "images_detectron2/validation", "annotations_detectron2/validation", UINT16_TIFF),),
                "ade847.json", "python -m evaluation prepare ade20k-847 --src ADE20K_2021_17_01", 2000),
    DatasetSpec("pc-59", "VOCdevkit/VOC2010",
                (Form("detectron2", "JPEGImages", "annotations_detectron2/pc59_val", UINT8_255),),
                "pc59.json", "python -m evaluation prepare pc-59 --src VOCdevkit/VOC2010", 5104),
    DatasetSpec("pc-459", "VOCdevkit/VOC2010",
                (Form("detectron2", "JPEGImages", "annotations_detectron2/pc459_val", UINT16_TIFF),),
                "pc459.json", "python -m evaluation prepare pc-459 --src VOCdevkit/VOC2010", 5104),
    DatasetSpec("voc-20", "VOCdevkit/VOC2012",
                (Form("detectron2", "JPEGImages", "annotations_detectron2/val", UINT8_255),),
                "voc20.json", "python -m evaluation prepare voc-20 --src VOCdevkit/VOC2012", 1449),
    DatasetSpec("synth", "semantic",
                (Form("sceneparsing", "images/validation", "annotations/validation", UINT8_SCENEPARSING),),
                None, "python -m pipeline synth --out DIR   (then --root DIR or DIR/semantic)",
                class_loader=_synth_classes),
)}


def open_dataset(name: str, root: str | Path) -> SemSegDataset:
    """The dataset ``name`` under ``root``; :class:`DatasetError` names the expected layout and the
    prepare command when the root is missing or holds no image/label pairs."""
    if name not in SPECS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}")
    spec = SPECS[name]
    given = Path(root).expanduser()
    hint = f"expected {spec.layout()}; make it with: {spec.prepare}"
    if not given.is_dir():
        raise DatasetError(f"{name}: dataset root {given} is not a directory; {hint}")
    candidates = [given, given / spec.folder]
    for base in candidates:
        for form in spec.forms:
            images, labels = base / form.images, base / form.labels
            if not (images.is_dir() and labels.is_dir()):
                continue
            samples = pair_files(images, labels, form.encoding.suffix)
            if not samples:
                raise DatasetError(f"{name}: no image/label pairs with the same stem in {images} and {labels} "
                                   f"(labels *{form.encoding.suffix}); {hint}")
            classes = spec.class_loader(base) if spec.class_loader else load_class_file(spec.class_file)
            return SemSegDataset(name, base, samples, form.encoding, classes, form.name)
    raise DatasetError(f"{name}: {given} does not hold the dataset; {hint}")
