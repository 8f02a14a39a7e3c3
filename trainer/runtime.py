"""What every trainer entry point needs before its first step: the model, seeds, the precision.

Shared by training (:mod:`trainer.train`) and the feature cache (:mod:`trainer.cache`), so both
build the same model from the same resolved config and run the backbones under the same autocast
rule (the cache must hold what training from images would compute).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .config import TrainConfig
from .model import ModelConfig, USEModel


def seed_everything(seed: int) -> None:
    """Python, numpy and torch global RNGs (model init and anything else drawing from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The training config's model YAML (path or inline mapping), resolved once: every derived value
    (grid, image sizes, joint-space dim, DINOv2 patch) is filled in here and not rewritten below."""
    source = cfg.model_source()
    model_cfg = ModelConfig.from_dict(source) if isinstance(source, dict) else ModelConfig.from_yaml(source)
    return model_cfg.resolved()


def build_model(cfg: TrainConfig) -> USEModel:
    """The USE model of the config; the trainable head is initialised from ``cfg.seed`` (caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return USEModel(model_config(cfg))


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast for ``precision="bf16"``, or ``"auto"`` on CUDA; a no-op context otherwise (fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
