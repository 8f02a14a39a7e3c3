"""Checkpoints hold only safetensors and JSON, and restore weights, optimizer and RNG exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    resolve_checkpoint,
    save_checkpoint,
)
from trainer.distributed import DistInfo

INFO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class Net(torch.nn.Module):
    """A frozen part and a trainable part, like USEModel."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.frozen(x))) * self.scale


def _trained() -> tuple[Net, torch.optim.AdamW]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.98))
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    net, opt = _trained()
    state = {"step": 3, "epoch": 0, "samples_seen": 15}
    path = save_checkpoint(tmp_path, net, opt, state, INFO)
    after_save = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(0)
    other = Net()  # frozen weights come from the "config" (the same seed), trainable ones from the checkpoint
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1.0)
    got = load_checkpoint(path, other, other_opt, INFO)

    assert got["step"] == 3 and got["samples_seen"] == 15 and got["world_size"] == 1
    for (n, a), (_, b) in zip(net.named_parameters(), other.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), n
    a_sd, b_sd = opt.state_dict(), other_opt.state_dict()
    assert a_sd["param_groups"] == b_sd["param_groups"]
    for idx, fields in a_sd["state"].items():
        for k, v in fields.items():
            assert torch.equal(v, b_sd["state"][idx][k]), (idx, k)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == after_save[1:]
    load_checkpoint(path, other, other_opt, INFO)
    assert torch.equal(torch.rand(3), after_save[0])
    # and the restored optimizer steps exactly like the original
    x = torch.randn(5, 4)
    for m, o in ((net, opt), (other, other_opt)):
        m(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(net.head.weight, other.head.weight)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    net, opt = _trained()
    path = save_checkpoint(tmp_path, net, opt, {"step": 3}, INFO)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "trainer_state.json"]
    for p in path.iterdir():  # each file parses as safetensors or JSON: neither can hold a pickle
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys())
        else:
            json.loads(p.read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["head.bias", "head.weight", "norm.bias", "norm.weight", "scale"]  # no frozen


def test_optimizer_flattening_keeps_structure():
    _, opt = _trained()
    tensors, structure = optimizer_to_flat(opt, ["a", "b", "c", "d", "e"])
    json.dumps(structure)  # JSON-able
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = optimizer_from_flat(tensors, json.loads(json.dumps(structure)))
    assert back["param_groups"][0]["betas"] == (0.9, 0.98)
    assert set(back["state"]) == set(opt.state_dict()["state"])


def test_latest_resolution_and_pruning(tmp_path):
    net, opt = _trained()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, net, opt, {"step": step}, INFO, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert resolve_checkpoint(tmp_path, "latest").name == "step-00000003"
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")  # names a missing one
    assert resolve_checkpoint(tmp_path, "latest").name == "step-00000003"
    assert resolve_checkpoint(tmp_path / "nothing", "latest") is None
    assert resolve_checkpoint(tmp_path, None) is None
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path, str(tmp_path / "nope"))


def test_optimizer_saved_for_another_grouping_is_refused(tmp_path):
    """Optimizer state is indexed by position over the groups: a regrouping must not load silently."""
    net, opt = _trained()
    path = save_checkpoint(tmp_path, net, opt, {"step": 3}, INFO)
    other = Net()
    params = [p for p in other.parameters() if p.requires_grad]
    regrouped = torch.optim.AdamW([{"params": params[2:]}, {"params": params[:2]}], lr=1e-2)
    with pytest.raises(ValueError, match="other parameters"):
        load_checkpoint(path, other, regrouped, INFO)
