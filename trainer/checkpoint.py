"""Training checkpoints in safetensors and JSON only: nothing is ever pickled or unpickled.

A checkpoint is a directory ``OUTPUT/checkpoints/step-NNNNNNNN/``::

    model.safetensors       trainable weights, by parameter name (the frozen backbones come from the model config)
    optimizer.safetensors   every tensor of the optimizer state, the rest (param groups, names) as JSON metadata
    trainer_state.json      step, epoch, position in the epoch, samples seen, the LR schedule, world size
    rng-rank{R}.safetensors torch CPU/CUDA generator states as uint8 tensors, numpy's as uint32, python's as JSON

It is written under a temporary name and renamed into place, then ``checkpoints/latest`` (a text
file naming it) is replaced atomically, so a crash mid-save leaves the previous checkpoint as the
latest. In DDP rank 0 writes the shared files (weights and optimizer state are identical on every
rank) and each rank its RNG file; the checkpoint directory must be on a filesystem all ranks see.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .distributed import DistInfo, barrier
from .model import named_trainable

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d{8})$")
LATEST = "latest"


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any] | None = None) -> None:
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata={"json": json.dumps(meta)} if meta is not None else None)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        meta = f.metadata() or {}
    return tensors, json.loads(meta["json"]) if "json" in meta else None


# -- the pieces -------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: what a checkpoint restores (frozen weights come from config)."""
    return dict(named_trainable(model))


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's own order (group by group), which is how its state is indexed."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_to_flat(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``state.{i}.{field}``) and JSON-able structure."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, fields in sd["state"].items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{field}"] = value
            else:
                scalars.setdefault(str(idx), {})[field] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "param_names": names}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, field = key.split(".", 2)
        state.setdefault(int(idx), {})[field] = value
    for idx, fields in structure["scalars"].items():
        state.setdefault(int(idx), {}).update(fields)
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG's state as tensors + JSON (python's ``random`` state is a tuple of ints)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# -- save / load ------------------------------------------------------------------------------
def save_checkpoint(output: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], info: DistInfo, keep: int = 2) -> Path:
    """Write ``step-{state['step']}`` atomically on all ranks (call it on every rank) and mark it latest."""
    root = checkpoint_root(output)
    name = f"step-{int(state['step']):08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if info.is_master:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    rng_tensors, rng_meta = rng_state()
    _save_tensors(rng_tensors, tmp / f"rng-rank{info.rank}.safetensors", rng_meta)
    if info.is_master:
        params = trainable_state(model)
        _save_tensors(params, tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer, optimizer_param_names(model, optimizer))
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors", opt_meta)
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "world_size": info.world_size}, indent=1))
    barrier()
    if info.is_master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, root / LATEST)
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def list_checkpoints(output: str | Path) -> list[Path]:
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def resolve_checkpoint(output: str | Path, resume: str | None) -> Path | None:
    """``resume``: ``"latest"`` (the one ``checkpoints/latest`` names, else the highest step), a path, or None."""
    if resume is None:
        return None
    if resume != LATEST:
        p = Path(resume)
        if not (p / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
        return p
    marker = checkpoint_root(output) / LATEST
    if marker.exists():
        p = checkpoint_root(output) / marker.read_text().strip()
        if (p / "trainer_state.json").exists():
            return p
        log.warning("%s names %s, which is incomplete; falling back to the newest complete one", marker, p.name)
    complete = [p for p in list_checkpoints(output) if (p / "trainer_state.json").exists()]
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: DistInfo, restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``path``; return the trainer state (step, epoch...)."""
    path = Path(path)
    weights, _ = _load_tensors(path / "model.safetensors")
    params = trainable_state(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path}: trainable weights differ from the model (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(weights[name].shape)}, model {tuple(p.shape)}")
            p.copy_(weights[name])
    if optimizer is not None:
        tensors, structure = _load_tensors(path / "optimizer.safetensors")
        if structure["param_names"] != optimizer_param_names(model, optimizer):  # state is indexed by position
            raise ValueError(f"{path}: optimizer was saved for other parameters or another grouping of them")
        sd = optimizer_from_flat(tensors, structure)
        optimizer.load_state_dict(sd)
    if restore_rng:
        rng_file = path / f"rng-rank{info.rank}.safetensors"
        if not rng_file.exists():
            log.warning("%s missing (world size changed?); using rank 0's RNG state", rng_file.name)
            rng_file = path / "rng-rank0.safetensors"
        set_rng_state(*_load_tensors(rng_file))
    state = json.loads((path / "trainer_state.json").read_text())
    log.info("resumed from %s at step %d", path, state["step"])
    return state

