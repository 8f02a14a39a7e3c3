"""Training checkpoints in safetensors and JSON only: nothing is ever pickled or unpickled.

A checkpoint is a directory ``OUTPUT/checkpoints/step-NNNNNNNN/``::

    model.safetensors       trainable weights, by parameter name (the frozen backbones come from the model config)
    optimizer.safetensors   every tensor of the optimizer state, the rest (param groups, names) as JSON metadata
    rng-rank{R}.safetensors torch CPU/CUDA generator states as uint8 tensors, numpy's as uint32, python's as JSON
    trainer_state.json      step, epoch, position in the epoch, samples seen, the LR schedule, world size,
                            and ``files``: the sha256 of every other file of the checkpoint

It is written under a temporary name and renamed into place, then ``checkpoints/latest`` (a text
file naming it) is replaced atomically, so a crash mid-save leaves the previous checkpoint as the
latest. In DDP rank 0 writes the shared files (weights and optimizer state are identical on every
rank) and each rank its RNG file; the checkpoint directory must be on a filesystem all ranks see.

Loading trusts nothing on disk: every file's hash is checked against the state file, the tensors
must match the model and be finite, and all of it is checked before anything is restored. With
``--resume`` a checkpoint that fails is skipped with a warning and the previous complete one is used
(every rank checks every file, so all ranks take the same one). ``latest`` and the step directories
count only when they resolve inside the run's ``checkpoints/`` folder. A checkpoint with non-finite
weights is never written.
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
from safetensors import SafetensorError, safe_open

from .distributed import DistInfo, barrier
from .errors import InputError, TrainingFailed
from .files import atomic_write_text, save_safetensors, sha256_file
from .model import named_trainable

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d{8})$")
LATEST = "latest"
STATE = "trainer_state.json"


class CheckpointError(InputError):
    """A checkpoint that must not be loaded (corrupt, incomplete, non-finite, for another model)."""


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any] | None = None) -> None:
    save_safetensors(tensors, path, metadata={"json": json.dumps(meta)} if meta is not None else None)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
        return tensors, json.loads(meta["json"]) if "json" in meta else None
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


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
    """Write ``step-{state['step']}`` atomically on all ranks (call it on every rank) and mark it latest.

    Raises :class:`~trainer.errors.TrainingFailed` (on every rank alike) instead of writing non-finite weights.
    """
    params = trainable_state(model)
    bad = _non_finite(params)
    if bad:
        raise TrainingFailed(f"refusing to write a checkpoint at step {state['step']}: non-finite weights in {bad}")
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
        _save_tensors(params, tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer, optimizer_param_names(model, optimizer))
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors", opt_meta)
    barrier()  # every rank's RNG file is in place: hash them all into the state file
    if info.is_master:
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
        atomic_write_text(tmp / STATE, json.dumps({**state, "world_size": info.world_size, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, name + "\n")
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def list_checkpoints(output: str | Path) -> list[Path]:
    """Step directories of the run, oldest first; only those that really lie under ``checkpoints/``."""
    root = checkpoint_root(output)
    if not root.is_dir() or not _inside(root, Path(output)):
        return []
    return sorted(p for p in root.iterdir()
                  if _STEP_RE.match(p.name) and p.is_dir() and p.resolve().parent == root.resolve())


def _latest_name(output: str | Path) -> str | None:
    """The step directory ``checkpoints/latest`` names, if it is a plain step name of this run."""
    marker = checkpoint_root(output) / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text(errors="replace").strip()
    if not _STEP_RE.match(name):
        log.warning("%s names %r, not a step directory of this run; ignored", marker, name[:80])
        return None
    return name


def candidates(output: str | Path, resume: str | None) -> list[Path]:
    """Checkpoints to try for ``resume``, best first: ``"latest"`` gives the one ``checkpoints/latest``
    names, then every other step directory newest first; a path gives just that path; None nothing."""
    if resume is None:
        return []
    if resume != LATEST:
        p = Path(resume)
        if not (p / STATE).is_file():
            raise CheckpointError(f"--resume-from {resume}: not a checkpoint directory (no {STATE})")
        return [p]
    found = list_checkpoints(output)[::-1]
    name = _latest_name(output)
    named = [p for p in found if p.name == name]
    if name is not None and not named:
        log.warning("checkpoints/latest names %s, which is missing; using the newest complete one", name)
    return named + [p for p in found if p.name != name]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer state after checking its files against their sha256; raises
    :class:`CheckpointError`. Checkpoints from before hashes were stored load with a warning."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable {STATE} ({type(e).__name__})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: {STATE} is not a trainer state")
    files = state.get("files")
    if files is None:
        log.warning("%s: written without file hashes; loading it unverified", path)
        return state
    for name in ("model.safetensors", "optimizer.safetensors"):
        if name not in files:
            raise CheckpointError(f"{path}: {STATE} lists no hash for {name}")
    for name, digest in files.items():
        f = path / name
        if "/" in name or not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its sha256 (truncated or altered)")
    return state


def resolve_checkpoint(output: str | Path, resume: str | None) -> Path | None:
    """The first of :func:`candidates` that passes :func:`verify_checkpoint` (warning about the others)."""
    for p in candidates(output, resume):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            if resume != LATEST:
                raise
            log.warning("%s; falling back to the previous checkpoint", e)
    return None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: DistInfo, restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``path``; return the trainer state (step, epoch...).

    Everything is read and checked (hashes, names, shapes, finiteness) before anything is restored,
    so a :class:`CheckpointError` leaves the model, optimizer and RNGs as they were.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    weights, _ = _load_tensors(path / "model.safetensors")
    params = trainable_state(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{path}: trainable weights differ from the model (missing {missing}, "
                              f"unexpected {unexpected})")
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, model {tuple(p.shape)}")
    bad = _non_finite(weights)
    if bad:
        raise CheckpointError(f"{path}: non-finite weights in {bad}")
    sd = None
    if optimizer is not None:
        tensors, structure = _load_tensors(path / "optimizer.safetensors")
        if structure is None or structure.get("param_names") != optimizer_param_names(model, optimizer):
            raise CheckpointError(f"{path}: optimizer was saved for other parameters or another grouping of them")
        bad = _non_finite(tensors)
        if bad:
            raise CheckpointError(f"{path}: non-finite optimizer state in {bad[:5]}")
        sd = optimizer_from_flat(tensors, structure)
    rng = None
    if restore_rng:
        rng_file = path / f"rng-rank{info.rank}.safetensors"
        if not rng_file.exists():
            log.warning("%s missing (world size changed?); using rank 0's RNG state", rng_file.name)
            rng_file = path / "rng-rank0.safetensors"
        rng = _load_tensors(rng_file)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    if sd is not None:
        optimizer.load_state_dict(sd)
    if rng is not None:
        set_rng_state(*rng)
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def restore(output: str | Path, resume: str | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            info: DistInfo) -> tuple[Path, dict[str, Any]] | None:
    """Load the checkpoint ``resume`` asks for (see :func:`candidates`), falling back past broken ones.

    Returns ``(path, state)``, or None when the run has no checkpoint yet. An explicit checkpoint
    path that fails raises; so does ``"latest"`` when checkpoints exist but none of them loads.
    """
    tried = candidates(output, resume)
    for p in tried:
        try:
            return p, load_checkpoint(p, model, optimizer, info)
        except CheckpointError as e:
            if resume != LATEST:
                raise
            log.warning("%s; falling back to the previous checkpoint", e)
    if tried:
        raise CheckpointError(f"none of the {len(tried)} checkpoints under {checkpoint_root(output)} can be loaded "
                              f"(see the warnings above); start afresh with --overwrite")
    return None
