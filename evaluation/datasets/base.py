"""A semantic segmentation dataset on disk: image/label pairs, the label encoding, the class list.

Every benchmark is the same thing in a different layout: an image folder, a label folder whose files
share the images' stems, and an encoding of label ids in the files. Pairs are matched by stem and
only the intersection is used (as detectron2's ``load_sem_seg``, which the published figures were
measured with), with a warning when the two folders disagree. Labels decode to ``int32`` class ids
``0..K-1`` with :data:`IGNORE` (-1) for ignored pixels, whatever the file's own ignore value is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..classes import ClassList

log = logging.getLogger(__name__)

IGNORE = -1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A missing or malformed dataset root; the message names the expected layout and the prepare command."""


@dataclass(frozen=True)
class LabelEncoding:
    """How label files store class ids: ``stored = id + offset`` as ``dtype``; ``ignore`` marks unlabelled
    pixels (with ``offset=1`` the ignore value is 0, the SceneParsing convention)."""

    dtype: str              # "uint8" | "uint16"
    ignore: int
    offset: int = 0
    suffix: str = ".png"    # ".png" | ".tif"

    def decode(self, stored: np.ndarray, num_classes: int, where: str = "") -> np.ndarray:
        """File values -> ``int32`` ids with :data:`IGNORE`; a value that is neither a class nor ignore is an error."""
        if stored.ndim != 2:
            raise ValueError(f"{where}: label must be one channel, got shape {stored.shape}")
        if stored.dtype != np.dtype(self.dtype):
            raise ValueError(f"{where}: label must be {self.dtype}, got {stored.dtype}")
        labels = stored.astype(np.int32) - self.offset
        labels[stored == self.ignore] = IGNORE
        bad = (labels >= num_classes) | (labels < IGNORE)
        if bad.any():
            raise ValueError(f"{where}: label value {int(stored[bad][0])} is neither a class id "
                             f"(0..{num_classes - 1} + {self.offset}) nor the ignore value {self.ignore}")
        return labels

    def encode(self, pred: np.ndarray) -> np.ndarray:
        """Class ids -> the file's values (a prediction saved in the dataset's own encoding)."""
        return (np.asarray(pred).astype(np.int64) + self.offset).astype(self.dtype)

    def save(self, pred: np.ndarray, path_without_suffix: Path) -> Path:
        path = Path(f"{path_without_suffix}{self.suffix}")
        Image.fromarray(self.encode(pred)).save(path, "TIFF" if self.suffix == ".tif" else "PNG")
        return path


@dataclass(frozen=True)
class Sample:
    key: str          # the file stem, unique in the dataset
    image: Path
    label: Path


@dataclass
class SemSegDataset:
    """The pairs of one split, their encoding and class list."""

    name: str
    root: Path
    samples: list[Sample]
    encoding: LabelEncoding
    classes: ClassList
    layout: str       # the form that was found, recorded in metrics.json

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_label(self, sample: Sample) -> np.ndarray:
        """``int32 [H, W]`` ids with :data:`IGNORE`; raises ``ValueError`` naming the file when malformed."""
        try:
            with Image.open(sample.label) as im:
                stored = np.array(im)
        except OSError as e:
            raise ValueError(f"{sample.label}: unreadable label ({e})") from e
        return self.encoding.decode(stored, self.num_classes, str(sample.label))


def pair_files(image_dir: Path, label_dir: Path, label_suffix: str) -> list[Sample]:
    """Images and labels matched by stem (their intersection, sorted by key)."""
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == label_suffix and p.is_file()}
    keys = sorted(images.keys() & labels.keys())
    if len(keys) != len(images) or len(keys) != len(labels):
        log.warning("%s and %s hold %d and %d files; using their %d common stems",
                    image_dir, label_dir, len(images), len(labels), len(keys))
    return [Sample(k, images[k], labels[k]) for k in keys]
