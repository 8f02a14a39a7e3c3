"""Helpers shared by the trainer tests: the demo config with test-sized overrides, metrics, weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "trainer" / "configs" / "demo.yaml"

#: Small and fast on a shared 2-core CPU: 4 images x <= 8 segments per step, no worker processes.
FAST = ["data.batch_size=4", "data.workers=0", "data.max_segments_per_image=8", "data.shuffle_buffer=16",
        "optim.warmup_steps=2", "optim.lr=5e-3", "log_every=1"]


def config(*overrides: str) -> TrainConfig:
    return TrainConfig.from_yaml(DEMO, [*FAST, *overrides])


def losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Trainable weights of a final model folder or a checkpoint folder (both hold model.safetensors)."""
    return load_file(str(path / "model.safetensors"))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
