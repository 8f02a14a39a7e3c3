"""Tiny models built once per test process, for the stage tests and the job's end-to-end tests.

``tiny_model_dirs()`` builds LLaVA, Grounding DINO and SAM (``tests/tiny_models.py``) into one
temporary directory the first time it is called and returns their paths; the directory is removed
when the process exits. It also pins torch to one thread: on a small shared CPU, two intra-op
threads per test process made the tiny forwards 50x slower.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tiny_models import build_tiny_grounding_dino, build_tiny_llava, build_tiny_sam


@dataclass(frozen=True)
class TinyModels:
    root: Path
    llava: Path
    grounding_dino: Path
    sam: Path


@functools.cache
def tiny_model_dirs() -> TinyModels:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="use-tiny-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return TinyModels(root=root, llava=build_tiny_llava(root / "llava"),
                      grounding_dino=build_tiny_grounding_dino(root / "grounding_dino"), sam=build_tiny_sam(root / "sam"))


def image_bytes(width: int, height: int, color=(120, 80, 40), fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    return buf.getvalue()


def make_batch(records, images: list[bytes]) -> dict:
    """A Ray Data numpy batch (``key``, ``image``, ``record``) as the job hands it to a stage."""
    import numpy as np

    from pipeline.record import with_records

    keys = np.array([f"{r.source}_{r.image_id}" for r in records], dtype=object)
    return with_records({"key": keys, "image": np.array(images, dtype=object)}, list(records))
