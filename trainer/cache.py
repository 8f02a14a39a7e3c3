"""``cache-features``: run the frozen backbones once and store their multi-level features.

Both backbones are frozen, so their features for an image never change; computing them once turns
each later training step into the cheap part only (LLN, merge, head). For each shard
``PREFIX-NNNNNN.tar`` one file ``PREFIX-NNNNNN.features.safetensors`` is written (beside the shards
by default, or in ``--out``), holding ``{sample key}/{level}`` -> ``[1 + G*G, C]`` tensors (level as
``model.backbone_features`` names it, e.g. ``clip.8``), in ``cache_dtype`` (fp16 by default: half
the disk; fp32 reproduces training from images to float rounding, which the tests use).

The metadata carries a fingerprint of everything that determines the features (backbones, layers,
image sizes, grid), and the trainer refuses a cache whose fingerprint differs from its model's.
A shard's file is written through a temporary name and renamed, so a file that exists is complete
and an interrupted job resumes where it stopped. Files are written tensor by tensor (the
safetensors layout is an 8-byte header length, a JSON header, then raw bytes), so memory stays at
one batch even for shards whose features are many GB. Under torchrun each rank takes every
``world``-th shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch

import shards

from .config import TrainConfig
from .data import cache_path
from .distributed import barrier, init_distributed

log = logging.getLogger(__name__)

_BACKBONE_FIELDS = ("clip", "clip_layers", "dino", "dino_layers", "grid", "clip_image_size", "dino_image_size",
                    "dino_patch_size")
_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


def fingerprint(model_config: Any) -> str:
    """A short hash of the config fields that decide the backbone features (not the trainable head)."""
    d = model_config.to_dict()
    relevant = {k: d.get(k) for k in _BACKBONE_FIELDS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class StreamingSafetensorsWriter:
    """Writes a safetensors file without holding all tensors: raw bytes to a spool, header at close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.spool_path = self.path.with_name(f".{self.path.name}.spool")
        self.spool = self.spool_path.open("wb")
        self.header: dict[str, Any] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.header:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().to("cpu").contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.spool.write(data)
        self.header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + len(data)]}
        self.offset += len(data)

    def close(self, metadata: dict[str, str]) -> Path:
        self.spool.close()
        header = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
        with self.tmp.open("wb") as out, self.spool_path.open("rb") as spool:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(spool, out, 1 << 24)
            out.flush()
            os.fsync(out.fileno())
        os.replace(self.tmp, self.path)
        self.spool_path.unlink()
        return self.path

    def abort(self) -> None:
        self.spool.close()
        for p in (self.spool_path, self.tmp):
            p.unlink(missing_ok=True)


def _valid_cache(path: Path, fp: str) -> bool:
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("fingerprint") == fp
    except Exception:  # a truncated or foreign file: recompute it
        return False


def cache_features(cfg: TrainConfig, shards_dir: str | Path, out_dir: str | Path | None = None,
                   batch_size: int = 32, device: str | None = None) -> list[Path]:
    """Write the feature cache of every shard (this rank's share); returns the files written or found."""
    from .train import autocast_for, build_model

    info = init_distributed(device)
    model = build_model(cfg).to(info.device).eval()
    fp = fingerprint(model.config)
    dtype = torch.float16 if cfg.cache_dtype == "fp16" else torch.float32
    out = Path(out_dir or cfg.cache_dir or shards_dir)
    out.mkdir(parents=True, exist_ok=True)
    urls = shards.shard_urls(shards_dir)
    mine = urls[info.rank::info.world_size]
    done: list[Path] = []
    for url in mine:
        path = cache_path(out, url)
        if _valid_cache(path, fp):
            log.info("%s: up to date, skipped", path.name)
            done.append(path)
            continue
        t0, n = time.perf_counter(), 0
        writer = StreamingSafetensorsWriter(path)
        try:
            batch: list[shards.ShardSample] = []
            for sample in [*shards.iter_samples(url, on_error="skip"), None]:
                if sample is not None:
                    batch.append(sample)
                if batch and (sample is None or len(batch) == batch_size):
                    # the same precision as training from images
                    n += _write_batch(model, batch, writer, dtype, info.device,
                                      autocast_for(info.device, cfg.precision))
                    batch = []
            meta = {"fingerprint": fp, "dtype": cfg.cache_dtype, "grid": str(model.grid), "samples": str(n),
                    "shard": Path(url).name, "model_config": json.dumps(model.config.to_dict())}
            done.append(writer.close(meta))
        except BaseException:
            writer.abort()
            raise
        log.info("%s: %d samples in %.1f s", path.name, n, time.perf_counter() - t0)
    barrier()
    return done


def _write_batch(model, batch: list[shards.ShardSample], writer: StreamingSafetensorsWriter,
                 dtype: torch.dtype, device: torch.device, autocast) -> int:
    pixels = [model.transform(s.image()) for s in batch]
    stacked = {k: torch.stack([p[k] for p in pixels]).to(device) for k in pixels[0]}
    with torch.no_grad(), autocast:
        feats = model.backbone_features(stacked)
    for i, s in enumerate(batch):
        for level, f in feats.items():
            writer.add(f"{s.key}/{level}", f[i].float().to(dtype))
    return len(batch)
