"""Process-group set-up for torchrun and SLURM, as open_clip's ``distributed.py`` does it.

torchrun exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; under
``srun`` only ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` exist, so they are copied into the
torch names (``MASTER_ADDR``/``MASTER_PORT`` must then come from the job script). NCCL is used on
GPUs and gloo on CPU. A single process (no ``WORLD_SIZE`` > 1) runs without a process group, so
every helper here also works in a plain ``python -m trainer train``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_RANK_VARS = ("RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_LOCAL_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def world_info_from_env() -> tuple[int, int, int]:
    """(local_rank, rank, world_size) from torchrun, SLURM, MPI or PMI variables; (0, 0, 1) when alone."""
    return _first_int(_LOCAL_VARS, 0), _first_int(_RANK_VARS, 0), _first_int(_SIZE_VARS, 1)


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process: the one helper every part of the trainer asks.

    The launcher's variables first, as webdataset's ``split_by_node`` reads them (they are also what
    DataLoader worker processes inherit, where no process group exists), then an initialised process
    group (processes started without a launcher, e.g. tests), else ``(0, 1)``.
    """
    if any(name in os.environ for name in _RANK_VARS):
        _, rank, world = world_info_from_env()
        return rank, world
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group if launched with several processes; pick this process's device.

    ``device`` forces ``"cpu"`` or ``"cuda"``; by default CUDA when available. The backend follows
    the device: NCCL for CUDA, gloo for CPU (NCCL cannot move CPU tensors).
    """
    local_rank, rank, world_size = world_info_from_env()
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # SLURM without torchrun: give torch the names it reads (env:// init).
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        log.info("rank %d/%d (local %d) joined the %s process group on %s (store %s:%s, restart %s)", rank,
                 world_size, local_rank, backend, dev, os.environ.get("MASTER_ADDR", "?"),
                 os.environ.get("MASTER_PORT", "?"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (so that all ranks take the same branch, e.g. skip a step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (throughput, counts); identity when alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank_divergence(tensors: list[torch.Tensor]) -> float:
    """Largest elementwise spread of these tensors across ranks (0.0 when DDP kept them identical)."""
    if not tensors:
        return 0.0
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
