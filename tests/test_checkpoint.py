"""Checkpoints hold only safetensors and JSON, and restore weights, optimizer and RNG exactly."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    resolve_checkpoint,
    restore,
    save_checkpoint,
)
from trainer.distributed import DistInfo
from trainer.errors import TrainingFailed
from trainer.files import sha256_file

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
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
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


# --- integrity (a checkpoint on disk is untrusted) ----------------------------------------------------
def _three(tmp_path):
    net, opt = _trained()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, net, opt, {"step": step}, INFO, keep=3)
    return net, opt


def _fresh() -> tuple[Net, torch.optim.AdamW]:
    torch.manual_seed(0)
    net = Net()
    return net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.98))


def _rehash(ckpt) -> None:
    """Make the state file's hashes match the (altered) files: what a careful forger would do."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"] = {name: sha256_file(ckpt / name) for name in state["files"]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_state_holds_the_sha256_of_every_file(tmp_path):
    net, opt = _trained()
    path = save_checkpoint(tmp_path, net, opt, {"step": 3}, INFO)
    files = json.loads((path / "trainer_state.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"]
    for name, digest in files.items():
        assert digest == hashlib.sha256((path / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "nan weights", "missing file", "bad state json"])
def test_damaged_latest_falls_back_to_the_previous(tmp_path, caplog, damage):
    _three(tmp_path)
    latest = tmp_path / "checkpoints" / "step-00000003"
    model_file = latest / "model.safetensors"
    if damage == "truncated":
        data = model_file.read_bytes()
        model_file.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        data = bytearray((latest / "optimizer.safetensors").read_bytes())
        data[-3] ^= 0x01  # inside a tensor: the file still parses, only the hash can tell
        (latest / "optimizer.safetensors").write_bytes(bytes(data))
    elif damage == "nan weights":
        w = load_file(str(model_file))
        w["head.weight"][0, 0] = float("nan")
        save_file(w, str(model_file))
        _rehash(latest)  # hashes agree: the finiteness check must catch it
    elif damage == "missing file":
        (latest / "rng-rank0.safetensors").unlink()
    else:
        (latest / "trainer_state.json").write_text("{not json")
    net, opt = _fresh()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        path, state = restore(tmp_path, "latest", net, opt, INFO)
    assert path.name == "step-00000002" and state["step"] == 2
    assert "step-00000003" in caplog.text and "falling back" in caplog.text
    assert any(not torch.equal(before[n], p) for n, p in net.named_parameters() if p.requires_grad)  # step 2 loaded
    with pytest.raises(CheckpointError):  # named explicitly, the damaged one is refused, no fallback
        restore(tmp_path, str(latest), *_fresh(), INFO)


def test_a_failed_load_changes_nothing(tmp_path):
    net, opt = _trained()
    path = save_checkpoint(tmp_path, net, opt, {"step": 3}, INFO)
    w = load_file(str(path / "model.safetensors"))
    w["scale"] = torch.tensor(float("inf"))
    save_file(w, str(path / "model.safetensors"))
    _rehash(path)
    other, other_opt = _fresh()
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="non-finite weights"):
        load_checkpoint(path, other, other_opt, INFO)
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())
    assert torch.equal(rng, torch.get_rng_state()) and not other_opt.state_dict()["state"]


def test_no_loadable_checkpoint_is_an_error(tmp_path):
    _three(tmp_path)
    for p in list_checkpoints(tmp_path):
        (p / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        restore(tmp_path, "latest", *_fresh(), INFO)
    assert restore(tmp_path / "new", "latest", *_fresh(), INFO) is None  # no checkpoints yet: a fresh start


def test_latest_never_leaves_the_run_directory(tmp_path):
    run, evil = tmp_path / "run", tmp_path / "evil"
    net, opt = _trained()
    save_checkpoint(run, net, opt, {"step": 1}, INFO)
    with torch.no_grad():
        net.head.weight.fill_(7.0)
    outside = save_checkpoint(evil, net, opt, {"step": 9}, INFO)  # a complete, valid checkpoint elsewhere
    root = run / "checkpoints"
    for name in (f"../../evil/checkpoints/{outside.name}", str(outside)):
        (root / "latest").write_text(name + "\n")
        assert resolve_checkpoint(run, "latest").name == "step-00000001"
    (root / "step-00000009").symlink_to(outside, target_is_directory=True)  # a step directory pointing out
    (root / "latest").write_text("step-00000009\n")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]
    path, state = restore(run, "latest", *_fresh(), INFO)
    assert path == root / "step-00000001" and state["step"] == 1


def test_non_finite_weights_are_never_saved(tmp_path):
    net, opt = _trained()
    with torch.no_grad():
        net.head.bias[0] = float("nan")
    with pytest.raises(TrainingFailed, match="non-finite weights"):
        save_checkpoint(tmp_path, net, opt, {"step": 4}, INFO)
    assert list_checkpoints(tmp_path) == []


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        net, opt = _trained()
        path = save_checkpoint(tmp_path, net, opt, {"step": 1}, INFO)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*path.iterdir(), tmp_path / "checkpoints" / "latest"]}
    assert set(modes.values()) == {0o644}, modes
