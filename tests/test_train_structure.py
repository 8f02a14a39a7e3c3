"""One definition each: the resolved model config, the trainable parameters, the rank and world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import config

from shards.writer import stats_path
from trainer.checkpoint import trainable_state
from trainer.distributed import rank_world
from trainer.model import ModelConfig, named_trainable
from trainer.model.backbones import FrozenBackbones
from trainer.optim import make_optimizer
from trainer.runtime import build_model, model_config


def test_model_config_is_resolved_once_and_fully():
    cfg = model_config(config("steps=1"))
    assert cfg.is_resolved and (cfg.grid, cfg.clip_image_size, cfg.embed_dim, cfg.dino_patch_size) == (8, 64, 32, 14)
    assert cfg.resolved() is cfg  # nothing below rewrites it
    model = build_model(config("steps=1"))
    assert model.config == cfg and model.backbones.config is model.config
    assert model.transform.clip_size == 64 and model.transform.dino_size == 56
    with pytest.raises(ValueError, match="resolved"):
        FrozenBackbones(ModelConfig.from_dict({**cfg.to_dict(), "grid": None}))
    assert not hasattr(ModelConfig, "clip_patch_size")


def test_backbone_fingerprint_ignores_the_head():
    cfg = model_config(config("steps=1"))
    assert cfg.backbone_fingerprint() == cfg.model_copy(update={"hidden_dim": 7, "use_cls": False}).backbone_fingerprint()
    assert cfg.backbone_fingerprint() != cfg.model_copy(update={"clip_layers": [1, 2]}).backbone_fingerprint()


def test_one_definition_of_trainable_parameters():
    cfg = config("steps=1")
    model = build_model(cfg)
    names = [n for n, _ in named_trainable(model)]
    assert names and not any(n.startswith("backbones.") for n in names)
    opt = make_optimizer(model, cfg.optim)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for _, p in named_trainable(model)}
    assert list(trainable_state(model)) == names == list(model.trainable_state_dict())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.trainable_parameters()}


def test_rank_world_from_launcher_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert rank_world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert rank_world() == (3, 8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_world() == (1, 2)  # torchrun's names first, as webdataset reads them
    assert torch.distributed.is_available()


def test_stats_path_strips_only_a_tar_suffix():
    assert stats_path("d/x-000001.tar") == Path("d/x-000001.stats.json")
    assert stats_path("d/x-000001") == Path("d/x-000001.stats.json")  # was "d/x-00.stats.json"
