"""Writing the trainer's files: atomically, hashed, with the usual permissions.

``safetensors.torch.save_file`` creates its file ``-rw-------`` whatever the umask, so teammates on
shared storage could not read checkpoints or models; :func:`save_safetensors` serialises with
``safetensors.torch.save`` and writes the bytes through Python's ``open`` (mode ``0o666 & ~umask``,
as every other file). Writes go to a temporary name in the same folder and are renamed into place,
so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``tensors`` (moved to CPU, contiguous) as a safetensors file, atomically, umask permissions."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, safetensors_bytes(flat, metadata=metadata))


def sha256_file(path: str | Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
