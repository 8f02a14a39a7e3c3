"""Embedding the segments of shards: one shard at a time, in this process or on Ray Data actors.

A shard is the unit of work and of resumption (:mod:`evaluation.search.store`). Images are batched
for the backbones within a shard only, so a shard's vectors never depend on which other shards are
indexed with it. On Ray, ``map_batches`` runs :class:`EmbedActor` (model loaded once per actor, GPUs
per actor from the config) on an ``ActorPoolStrategy`` pool, one shard per call, and the parts come
back to the driver, which commits them: workers need to read the shards and the checkpoint, not to
write anywhere (as the evaluation's actors).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline.models import pick_device
from shards import ImageDecodeError, iter_samples
from shards.writer import file_sha256, read_stats, stats_path
from trainer.model import USEModel

from .config import IndexConfig
from .store import ROW_SCHEMA, Part, npy_bytes, parquet_bytes

log = logging.getLogger(__name__)


def shard_sha256(tar: Path) -> str:
    """The shard's sha256 from its stats file (written with it), else hashed from the tar."""
    if stats_path(tar).is_file():
        sha = read_stats(tar).sha256
        if sha:
            return sha
    return file_sha256(tar)


def load_model(checkpoint: str, device: str | None) -> USEModel:
    return USEModel.from_pretrained(checkpoint, map_location=pick_device(device)).eval()


def embed_shard(model: USEModel, tar: Path, batch_size: int, sha: str | None = None) -> Part:
    """Every segment of one shard: float16 unit vectors and their rows (segments with no pixel are skipped)."""
    vectors: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    failures: list[dict] = []
    empty = 0
    batch: list[tuple[Any, Any]] = []

    def flush() -> None:
        nonlocal empty
        if not batch:
            return
        out = model.embed_masks_batch([im for im, _ in batch], [[s.rle for s in m.segments] for _, m in batch],
                                      batch_size=batch_size)
        for (_, meta), emb in zip(batch, out, strict=True):
            emb = emb.float().cpu().numpy()
            keep = np.linalg.norm(emb, axis=1) > 0
            empty += int((~keep).sum())
            vectors.append(emb[keep].astype(np.float16))
            for seg, k in zip(meta.segments, keep, strict=True):
                if k:
                    rows.append({"shard": tar.name, "key": meta.key, "segment_id": seg.id,
                                 "bbox": [float(v) for v in seg.bbox], "area": int(seg.area), "width": meta.width,
                                 "height": meta.height, "texts": [{"text": t.text, "source": t.source,
                                                                   "score": float(t.score)} for t in seg.texts]})
        batch.clear()

    for sample in iter_samples(tar, on_error="skip"):
        if not sample.meta.segments:
            continue
        try:
            image = sample.image()
        except (ImageDecodeError, OSError) as e:
            failures.append({"key": sample.key, "error": f"image: {e}"})
            log.warning("%s %s: image not decoded (%s); its segments are not indexed", tar.name, sample.key, e)
            continue
        batch.append((image, sample.meta))
        if len(batch) >= batch_size:
            flush()
    flush()
    dim = int(model.config.embed_dim)
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
    return Part(shard=tar.name, shard_sha256=sha or shard_sha256(tar), vectors=stacked,
                rows=pa.Table.from_pylist(rows, schema=ROW_SCHEMA), failures=failures, empty_segments=empty)


def embed_local(checkpoint: str, tars: list[Path], cfg: IndexConfig, shas: dict[str, str]) -> Iterator[Part]:
    model = load_model(checkpoint, cfg.device)
    for tar in tars:
        with torch.inference_mode():
            yield embed_shard(model, tar, cfg.batch_size, shas[tar.name])


class EmbedActor:
    """A Ray actor: the USE model loaded once, then one shard per call."""

    def __init__(self, checkpoint: str, cfg_json: str):
        self.cfg = IndexConfig.model_validate_json(cfg_json)
        self.model = load_model(checkpoint, self.cfg.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {"shard": [], "vectors": [], "rows": [], "extra": []}
        for tar, sha in zip(batch["tar"].tolist(), batch["sha"].tolist(), strict=True):
            with torch.inference_mode():
                part = embed_shard(self.model, Path(tar), self.cfg.batch_size, sha)
            out["shard"].append(part.shard)
            out["vectors"].append(npy_bytes(part.vectors))
            out["rows"].append(parquet_bytes(part.rows))
            out["extra"].append(json.dumps({"sha": part.shard_sha256, "failures": part.failures,
                                            "empty": part.empty_segments}))
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def use_ray(cfg: IndexConfig) -> bool:
    if cfg.ray.mode == "auto":
        return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    return cfg.ray.mode == "ray"


def embed_on_ray(checkpoint: str, tars: list[Path], cfg: IndexConfig, shas: dict[str, str]) -> Iterator[Part]:
    """Shards spread over an actor pool; parts yielded as they arrive (not in shard order)."""
    started = False
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=cfg.ray.local_num_cpus, include_dashboard=False, **quiet)
        started = True
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_items([{"tar": str(t.resolve()), "sha": shas[t.name]} for t in tars],
                                 override_num_blocks=max(1, len(tars)))
        ds = ds.map_batches(EmbedActor, batch_size=1, batch_format="numpy",
                            fn_constructor_kwargs={"checkpoint": str(checkpoint), "cfg_json": cfg.model_dump_json()},
                            compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
                            num_gpus=cfg.ray.num_gpus or None, num_cpus=cfg.ray.num_cpus)
        for row in ds.iter_rows():
            extra = json.loads(row["extra"])
            yield Part(shard=row["shard"], shard_sha256=extra["sha"],
                       vectors=np.load(io.BytesIO(row["vectors"]), allow_pickle=False),
                       rows=pq.read_table(io.BytesIO(row["rows"])),
                       failures=extra["failures"], empty_segments=extra["empty"])
    finally:
        if started:
            ray.shutdown()

