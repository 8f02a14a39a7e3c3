"""What the model stages share: loading a model from a stage config, and decoding the images of a batch."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.models import ModelNotFoundError, load_pretrained
from pipeline.record import Record
from shards.image import DEFAULT_POLICY, ReadPolicy, decode_image

from .config import ModelStageConfig

log = logging.getLogger(__name__)


def decode_pending(batch: dict[str, np.ndarray], records: Sequence[Record], stage: str,
                   want: Any = None, policy: ReadPolicy = DEFAULT_POLICY) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(row, image)`` for rows without a failure (and, with ``want``, for which ``want(record)``).

    Images are decoded by the one decoder (:func:`shards.image.decode_image`) under the job's read
    policy (the stage config's ``read``, which the job sets from ``read.*``), so a stage accepts every
    image the read step accepted and sees the pixels the trainer will. An image that does not decode
    fails its record at ``stage``; the size of the decoded image is written into the record when the
    source did not know it.
    """
    for i, record in enumerate(records):
        if record.failure is not None or (want is not None and not want(record)):
            continue
        try:
            image = decode_image(batch["image"][i], policy)
        except Exception as e:  # one bad image never stops the batch
            record.fail(stage, e)
            continue
        if not record.width or not record.height:
            record.width, record.height = image.size
        elif (record.width, record.height) != image.size:
            record.fail(stage, f"decoded image is {image.size[0]}x{image.size[1]}, record says "
                               f"{record.width}x{record.height}")
            continue
        yield i, image


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def load_model(stage: str, config: ModelStageConfig, processor_cls: Any, model_cls: Any) -> tuple[Any, Any, torch.device, torch.dtype]:
    """Resolve the weights on disk and load ``(processor, model, device, dtype)`` once per actor.

    Missing weights raise :class:`pipeline.models.ModelNotFoundError` naming the download command;
    any other load failure is re-raised naming the stage and the model (a config error stops the job).
    """
    try:
        return load_pretrained(config.model, processor_cls, model_cls, models_dir=config.models_dir,
                               device=config.device, dtype=config.dtype)
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise load_error(stage, config.model, e) from e


def load_error(stage: str, spec: str, error: BaseException) -> RuntimeError:
    """A load-time failure that names the stage and the model (raised: a config error stops the job)."""
    return RuntimeError(f"{stage}: could not load model {spec!r}: {type(error).__name__}: {error}")
