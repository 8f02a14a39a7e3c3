"""Image preprocessing for the two frozen backbones.

Each backbone gets its own square input with its own normalisation: CLIP the OpenAI dataset
mean/std, DINOv2 the ImageNet mean/std (mixing them up silently degrades real checkpoints).

The whole image is resized (bicubic, as CLIP's own preprocessing) to the square side without
cropping or padding, aspect ratio not kept. Why: segment area weights are computed on a grid x
grid partition of the *original* image (:mod:`trainer.model.area_weights`); a plain resize maps that
partition exactly onto the backbone's patch grid, whereas a centre crop would drop segments at the
border and padding would shift the grid. The distortion is the price, and it is the same at
training and evaluation time.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(image: Image.Image, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(resized, dtype=np.float32) / 255.0  # [H, W, 3]
    return (torch.from_numpy(arr).permute(2, 0, 1) - mean) / std


class ImageTransform:
    """PIL image -> ``{"clip": [3, Hc, Wc], "dino": [3, Hd, Wd]}`` float tensors.

    Holds only ints and small tensors, so it pickles into DataLoader workers. ``"dino"`` is absent
    when DINOv2 is disabled.
    """

    def __init__(self, config: ModelConfig) -> None:
        cfg = config.resolved()  # a no-op for the resolved config a model passes
        self.clip_size = int(cfg.clip_image_size)
        self.dino_size = int(cfg.dino_image_size) if cfg.dino.enabled else None
        self.clip_mean = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
        self.clip_std = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
        self.dino_mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.dino_std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        image = image.convert("RGB")
        out = {"clip": _to_tensor(image, self.clip_size, self.clip_mean, self.clip_std)}
        if self.dino_size is not None:
            out["dino"] = _to_tensor(image, self.dino_size, self.dino_mean, self.dino_std)
        return out

    def __repr__(self) -> str:
        return f"ImageTransform(clip={self.clip_size}, dino={self.dino_size})"
