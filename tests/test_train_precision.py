"""bf16 autocast on GPU only (precision=auto), for training steps and the feature cache alike."""

from __future__ import annotations

import contextlib

import pytest
import torch

from trainer.runtime import autocast_for


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns when CUDA autocast is built without a GPU
def test_autocast_only_on_gpu_or_when_asked():
    assert isinstance(autocast_for(torch.device("cpu"), "auto"), contextlib.nullcontext)
    assert isinstance(autocast_for(torch.device("cpu"), "fp32"), contextlib.nullcontext)
    assert isinstance(autocast_for(torch.device("cuda", 0), "fp32"), contextlib.nullcontext)
    for device, precision in ((torch.device("cuda", 0), "auto"), (torch.device("cpu"), "bf16")):
        ctx = autocast_for(device, precision)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == device.type


def test_fp32_on_cpu_by_default():
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 2)
    with autocast_for(torch.device("cpu"), "auto"):
        assert lin(x).dtype == torch.float32
    with autocast_for(torch.device("cpu"), "bf16"):
        assert lin(x).dtype == torch.bfloat16
