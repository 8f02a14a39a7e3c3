"""``python -m evaluation index``: embed every segment of a shard set into a searchable index.

Shards whose part is already committed for this model and this shard content are skipped (resume
after a crash or Ctrl-C, and incremental indexing of new shards); when every shard has its part, the
parts are joined into the finished index (:mod:`evaluation.search.store`) with an ANN index above
``flat_max`` segments.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from huggingface_hub import hf_hub_download
from tqdm import tqdm

from shards import shard_urls

from . import ann
from .config import IndexConfig
from .embed import embed_local, embed_on_ray, shard_sha256, use_ray
from .store import ROW_SCHEMA, IndexFormatError, IndexStore

log = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "model.safetensors")


def model_identity(checkpoint: str | Path) -> dict[str, Any]:
    """``{fingerprint, checkpoint, embed_dim}``: the sha256 of the model's config and weights files
    (a local folder, or the Hub files from_pretrained reads), so a renamed copy is the same model."""
    src = Path(checkpoint)
    try:
        files = ([src / f for f in MODEL_FILES] if src.is_dir()
                 else [Path(hf_hub_download(str(checkpoint), f)) for f in MODEL_FILES])
    except Exception as e:  # noqa: BLE001 - hub errors are many; all mean "no such model here"
        raise FileNotFoundError(f"{checkpoint}: not a USE model folder and not available from the Hub ({e})") from e
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{checkpoint}: no {f.name} (a USE model folder has {' and '.join(MODEL_FILES)})")
        h.update(f.name.encode())
        h.update(f.read_bytes())
    config = json.loads(files[0].read_text())
    return {"fingerprint": h.hexdigest(), "checkpoint": str(src.resolve()) if src.is_dir() else str(checkpoint),
            "embed_dim": int(config.get("embed_dim", 0))}


def build_index(checkpoint: str | Path, shards_dir: str | Path, output: str | Path, cfg: IndexConfig | None = None,
                *, limit_shards: int | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Embed what is missing, then (when no shard is missing) write the finished index.

    Returns ``{"done": bool, "shards": n, "embedded": n_this_run, "pending": n_left, "index": index.json or None}``.
    """
    cfg = cfg or IndexConfig()
    tars = [Path(u) for u in shard_urls(shards_dir)]
    model = model_identity(checkpoint)
    store = IndexStore(output)
    store.begin(model, overwrite=overwrite)
    shas = {t.name: shard_sha256(t) for t in tars}
    if len(shas) != len(tars):
        raise IndexFormatError(f"{shards_dir}: two shards share a file name; index one directory at a time")
    todo = [t for t in tars if not store.part_done(t.name.removesuffix(".tar"), shas[t.name], model["fingerprint"])]
    run = todo[:limit_shards] if limit_shards is not None else todo
    log.info("%d shards, %d already indexed, embedding %d", len(tars), len(tars) - len(todo), len(run))
    parts = (embed_on_ray if use_ray(cfg) else embed_local)(str(checkpoint), run, cfg, shas) if run else iter(())
    for part in tqdm(parts, total=len(run), desc="index", unit="shard", disable=not progress):
        store.commit_part(part, model["fingerprint"])
    left = len(todo) - len(run)
    result: dict[str, Any] = {"done": left == 0, "shards": len(tars), "embedded": len(run), "pending": left,
                              "index": None}
    if left == 0:
        result["index"] = finish(store, tars, model, cfg, str(Path(shards_dir).resolve()))
    return result


def finish(store: IndexStore, tars: list[Path], model: dict[str, Any], cfg: IndexConfig, shards_dir: str) -> dict[str, Any]:
    """Join the parts of ``tars`` (in shard-name order) and write the finished index."""
    vectors, tables, parts = [], [], []
    for tar in sorted(tars, key=lambda t: t.name):
        v, rows, meta = store.load_part(tar.name.removesuffix(".tar"))
        vectors.append(v)
        tables.append(rows)
        parts.append({"shard": tar.name, "sha256": meta["shard_sha256"], "segments": int(v.shape[0]),
                      "failures": meta["failures"], "empty_segments": meta["empty_segments"]})
    dim = model["embed_dim"] or (vectors[0].shape[1] if vectors else 0)
    all_vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
    rows = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    n = int(all_vectors.shape[0])
    ann_bytes, search = None, {"kind": "flat"}
    if n > cfg.flat_max:
        index = ann.build_ivf(all_vectors.astype(np.float32), cfg.ivf)
        ivf = ann.faiss.extract_index_ivf(index)
        search = {"kind": "ivf", "nlist": int(ivf.nlist), "nprobe": cfg.ivf.nprobe, **cfg.ivf.model_dump(exclude={"nlist", "nprobe"})}
        ann_bytes = ann.ivf_bytes(index)
    doc = store.finish(model, search, shards_dir, ann_bytes, all_vectors, rows, parts)
    log.info("index of %d segments from %d shards (%s search) in %s", n, len(tars), search["kind"], store.root)
    return doc
