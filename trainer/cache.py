"""``cache-features``: run the frozen backbones once and store their multi-level features.

Both backbones are frozen, so their features for an image never change; computing them once turns
each later training step into the cheap part only (LLN, merge, head). For each shard
``PREFIX-NNNNNN.tar`` one file ``PREFIX-NNNNNN.features.safetensors`` is written (beside the shards
by default, or in ``--out``), holding ``{sample key}/{level}`` -> ``[1 + G*G, C]`` tensors (level as
``model.backbone_features`` names it, e.g. ``clip.8``), in ``cache_dtype``: bf16 by default (half
the disk, and exactly what the backbones produce under the bf16 autocast of GPU training; its
fp32-sized exponent cannot overflow), fp16 (more mantissa, but values beyond 65504 would become
inf) or fp32 (reproduces training from images to float rounding, which the tests use). Every
tensor is checked to be finite *after* the cast, so an fp16 overflow stops the job with the sample
and level named instead of training on inf later.

The writer and the reader (:class:`FeatureCacheReader`, used by the data loader) live here
together. The metadata carries the model config's
:meth:`~trainer.model.ModelConfig.backbone_fingerprint`, and the reader refuses a cache whose
fingerprint differs from its model's.
The CLIP text tower is frozen too, and a training step from cached features spends most of its
time encoding the step's texts (12 blocks over 77 tokens per text, against a small trainable
head). So the cache also holds, per sample, the text embeddings of every text of every segment
(``{key}/text_emb`` ``[T, embed_dim]``) and their :func:`~trainer.model.text_ids`
(``{key}/text_ids``), whichever text the loader draws: the step reads its rows instead of running
the tower. They are stored in fp32 whatever ``cache_dtype`` is (a few KB per sample), computed as
the live step computes them (``USEModel.encode_text``, outside autocast), so the loss and gradient
from the cache equal the live ones to float rounding (``tests/test_train_cache.py``). A text
missing from the cache (the shard changed after caching) is an error naming it; a cache written
before texts were cached (``format`` below 2) is recomputed by ``cache-features``, and read as it
is (texts encoded live) until then.

A shard's file is written through a temporary name and renamed, so a file that exists is complete
and an interrupted job resumes where it stopped. Files are written tensor by tensor (the
safetensors layout is an 8-byte header length, a JSON header, then raw bytes), so memory stays at
one batch even for shards whose features are many GB. Under torchrun each rank takes every
``world``-th shard.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import shards
from shards import storage

from .config import TrainConfig
from .distributed import barrier, init_distributed
from .errors import InputError
from .model import text_ids
from .runtime import autocast_for, build_model

log = logging.getLogger(__name__)

_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_FORMAT = "2"  # 1: backbone features; 2: plus text embeddings
TEXT_EMB, TEXT_IDS = "text_emb", "text_ids"  # per-sample entries beside the feature levels
TEXT_CHUNK = 256  # texts per text-tower forward while caching


def sample_texts(sample: shards.ShardSample) -> list[str]:
    """Every distinct text of the sample's segments, in order of appearance (what the loader may draw)."""
    return list(dict.fromkeys(t.text for s in sample.meta.segments for t in s.texts))


def cache_dir_for(cache_dir: str | Path | None, shards_dir: str | Path) -> Path:
    """Where the feature cache lives: ``cache_dir``, else beside the shards when they are local.

    The cache is a local folder (safetensors files memory-mapped and read per sample); shards in
    object storage need a ``cache_dir``, or the cache would go to a local path named like the URL.
    """
    if cache_dir:
        return Path(cache_dir)
    if storage.is_remote(str(shards_dir)):
        raise InputError(f"--shards {shards_dir} is in object storage and the feature cache is a local folder: "
                         f"set cache_dir=DIR (cache-features: --output DIR)")
    return Path(shards_dir)


def cache_path(cache_dir: str | Path, url: str) -> Path:
    """``<cache_dir>/<shard name without .tar>.features.safetensors``."""
    name = Path(url).name
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    return Path(cache_dir) / f"{stem}.features.safetensors"


class FeatureCacheReader:
    """Reads one sample's cached backbone features and text embeddings; safetensors files opened
    lazily, once per worker."""

    def __init__(self, cache_dir: str | Path, fingerprint: str):
        self.cache_dir = str(cache_dir)
        self.fingerprint = fingerprint
        self._open: dict[str, tuple[Any, dict[str, list[str]]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir, "fingerprint": self.fingerprint, "_open": {}}

    def _file(self, url: str) -> tuple[Any, dict[str, list[str]]]:
        path = str(cache_path(self.cache_dir, url))
        entry = self._open.get(path)
        if entry is None:
            if not os.path.exists(path):
                raise FileNotFoundError(f"no feature cache {path}: run `python -m trainer cache-features`")
            f = safe_open(path, framework="pt", device="cpu")
            found = (f.metadata() or {}).get("fingerprint")
            if found != self.fingerprint:
                raise ValueError(f"{path} was cached for another model config (fingerprint {found}, "
                                 f"expected {self.fingerprint}); rerun cache-features")
            index: dict[str, list[str]] = {}
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                key, level = name.split("/", 1)
                index.setdefault(key, []).append(level)
            entry = self._open[path] = (f, index)
        return entry

    def get(self, url: str, key: str) -> dict[str, torch.Tensor]:
        f, index = self._file(url)
        if key not in index:
            raise KeyError(f"sample {key} missing from the feature cache of {url}")
        return {level: f.get_tensor(f"{key}/{level}") for level in sorted(index[key])
                if level not in (TEXT_EMB, TEXT_IDS)}

    def text_embeddings(self, url: str, key: str, texts: list[str]) -> torch.Tensor | None:
        """Cached embeddings ``[len(texts), embed_dim]`` fp32 of texts of sample ``key``, or None when
        this cache holds no texts (written before format 2: the step encodes them live)."""
        f, index = self._file(url)
        if TEXT_EMB not in index.get(key, ()):
            return None
        rows = {t: i for i, t in enumerate(f.get_tensor(f"{key}/{TEXT_IDS}").tolist())}
        wanted = text_ids(texts).tolist()
        missing = [t for t, i in zip(texts, wanted, strict=True) if i not in rows]
        if missing:
            raise KeyError(f"text {missing[0]!r} of sample {key} is not in the feature cache of {url}: the shard "
                           f"changed after caching; rerun `python -m trainer cache-features`")
        return f.get_tensor(f"{key}/{TEXT_EMB}")[[rows[i] for i in wanted]]


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
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return meta.get("fingerprint") == fp and meta.get("format") == CACHE_FORMAT
    except Exception:  # a truncated or foreign file: recompute it
        return False


def cache_features(cfg: TrainConfig, shards_dir: str | Path, out_dir: str | Path | None = None,
                   batch_size: int = 32, device: str | None = None) -> list[Path]:
    """Write the feature cache of every shard (this rank's share); returns the files written or found."""
    out = cache_dir_for(out_dir or cfg.cache_dir, shards_dir)
    info = init_distributed(device)
    model = build_model(cfg).to(info.device).eval()
    fp = model.config.backbone_fingerprint()
    dtype = CACHE_DTYPES[cfg.cache_dtype]
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
            meta = {"fingerprint": fp, "format": CACHE_FORMAT, "dtype": cfg.cache_dtype, "grid": str(model.grid), "samples": str(n),
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
            stored = f[i].float().to(dtype)
            if not bool(torch.isfinite(stored).all()):
                where = "overflows fp16 (max 65504); use cache_dtype=bf16" if bool(torch.isfinite(f[i]).all()) \
                    else "is not finite in the backbone output"
                raise ValueError(f"feature cache: sample {s.key} level {level} {where}")
            writer.add(f"{s.key}/{level}", stored)
    _write_texts(model, batch, writer)
    return len(batch)


def _write_texts(model, batch: list[shards.ShardSample], writer: StreamingSafetensorsWriter) -> None:
    """Every text of the batch's samples through the frozen text tower, in fp32 outside autocast as
    :meth:`trainer.train.Trainer.train_step` encodes them; each distinct text once per chunk."""
    per_sample = [sample_texts(s) for s in batch]
    unique = list(dict.fromkeys(t for texts in per_sample for t in texts))
    row = {t: i for i, t in enumerate(unique)}
    with torch.no_grad():
        emb = torch.cat([model.encode_text(unique[i:i + TEXT_CHUNK]).float().cpu()
                         for i in range(0, len(unique), TEXT_CHUNK)]) if unique else None
    for s, texts in zip(batch, per_sample, strict=True):
        if texts:
            writer.add(f"{s.key}/{TEXT_EMB}", emb[[row[t] for t in texts]])
            writer.add(f"{s.key}/{TEXT_IDS}", text_ids(texts))
