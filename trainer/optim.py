"""AdamW and its learning-rate schedule, as open_clip trains CLIP.

The schedule is transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (a ``LambdaLR``):
linear warmup from 0 over ``warmup_steps``, then a half cosine down to ``min_lr`` at the last step.
The scheduler is stepped once per training step, skipped steps included, so the rate is a function
of the step alone: a resumed run builds it at the checkpoint's step (``last_epoch``) and continues
the same curve exactly, as the resume test checks against an uninterrupted run.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .config import OptimConfig
from .model import named_trainable


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (open_clip's rule: not on norms, biases, scales, temperature)."""
    decay, no_decay = [], []
    for name, p in named_trainable(model):
        (decay if p.ndim >= 2 and "logit_scale" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, step: int = 0) -> LambdaLR:
    """Warmup then cosine to ``min_lr`` at ``total_steps``, positioned at ``step`` (the steps already
    trained, 0 for a new run); call ``.step()`` after every training step."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # the config's peak, also when a restored optimizer carries another
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps,
                                                       num_training_steps=total_steps, min_lr=cfg.min_lr,
                                                       last_epoch=step - 1)
