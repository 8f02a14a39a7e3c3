"""The segment index on disk: per-shard parts committed atomically, then one finished index.

```
INDEX/
  build.json               format, version, model fingerprint: written when a build starts; a rerun
                           with another model (or a folder that is not an index) is refused
  parts/STEM.npy           float16 [n, D] vectors of one shard (STEM = the shard file name without .tar)
  parts/STEM.parquet       its rows; the parquet metadata names the shard's sha256, the model, the
                           vectors' sha256: the parquet is renamed into place after its .npy, so a part
                           whose parquet exists is complete (the shards' tar-then-stats rule)
  vectors.npy              float16 [N, D], L2-normalised, every part in shard-name order
  rows.parquet             one row per vector: shard, key, segment_id, bbox, area, width, height, texts
  ivf.faiss                the approximate index (above ``flat_max`` segments only)
  index.json               written last: format, version, model, counts, search settings, sha256 of each file
```

A shard is embedded exactly once per (model, shard content): a rerun skips every shard whose part
names the same shard sha256 and model fingerprint, so an index built in resumed pieces is the index
built in one go (batches never cross a shard). ``index.json`` is removed before the finished files are
rewritten and written after them, so a reader sees a whole index or "unfinished build".
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

FORMAT = "use-segment-index"
VERSION = 1
BUILD, INDEX_JSON, VECTORS, ROWS, IVF = "build.json", "index.json", "vectors.npy", "rows.parquet", "ivf.faiss"
PARTS = "parts"
_META_KEY = b"use_segment_index"

TEXT_TYPE = pa.struct([("text", pa.string()), ("source", pa.string()), ("score", pa.float32())])
ROW_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("segment_id", pa.int32()), ("bbox", pa.list_(pa.float32(), 4)),
    ("area", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("texts", pa.list_(TEXT_TYPE)),
])


class IndexFormatError(ValueError):
    """An index folder that is corrupt, unfinished, of another model, or not an index at all."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Temp name in the same folder, fsync, rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@dataclass
class Part:
    """The vectors and rows of one shard, plus the inputs it could not embed."""

    shard: str  # shard file name
    shard_sha256: str
    vectors: np.ndarray  # float16 [n, D]
    rows: pa.Table  # ROW_SCHEMA, n rows
    failures: list[dict] = field(default_factory=list)  # {key, error}
    empty_segments: int = 0  # segments whose mask has no pixel (no embedding)

    @property
    def stem(self) -> str:
        return self.shard.removesuffix(".tar")


class IndexStore:
    """Reads and writes one index folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.parts = self.root / PARTS

    # -- a build ---------------------------------------------------------------------------------
    def begin(self, model: dict[str, Any], overwrite: bool = False) -> None:
        """Claim the folder for a build with ``model`` ({fingerprint, checkpoint, embed_dim}).

        An existing build of the same model is resumed; one of another model, or a non-empty folder
        that is not an index, is refused (``overwrite`` clears a previous index of ours first)."""
        if self.root.exists() and not self.root.is_dir():
            raise IndexFormatError(f"{self.root}: exists and is not a directory")
        build = self.root / BUILD
        if self.root.is_dir() and any(self.root.iterdir()):
            if not build.is_file():
                raise IndexFormatError(f"{self.root}: not empty and not a USE segment index (no {BUILD}); "
                                       "choose another --output")
            old = self._read_json(build)
            if overwrite:
                self._clear()
            elif old["model"]["fingerprint"] != model["fingerprint"]:
                raise IndexFormatError(
                    f"{self.root}: holds an index of another model (fingerprint {old['model']['fingerprint'][:12]}, "
                    f"checkpoint {old['model'].get('checkpoint')}); this one is {model['fingerprint'][:12]}: "
                    "choose another --output or pass --overwrite")
        self.parts.mkdir(parents=True, exist_ok=True)
        for tmp in list(self.root.glob(".*.tmp")) + list(self.parts.glob(".*.tmp")):  # crash leftovers
            tmp.unlink()
        if not build.is_file():
            atomic_write(build, json.dumps({"format": FORMAT, "version": VERSION, "model": model}, indent=1).encode())

    def _clear(self) -> None:
        for name in (INDEX_JSON, VECTORS, ROWS, IVF):
            (self.root / name).unlink(missing_ok=True)
        for p in self.parts.glob("*"):
            p.unlink()
        (self.root / BUILD).unlink()

    def _read_json(self, path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexFormatError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IndexFormatError(f"{path}: not a USE segment index file (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                                   f"expected {FORMAT!r})")
        if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
            raise IndexFormatError(f"{path}: index format version {doc.get('version')!r}; this code reads up to {VERSION}")
        return doc

    def part_meta(self, stem: str) -> dict[str, Any] | None:
        """The committed part's metadata, or None when there is none (or it is unreadable: redone)."""
        path = self.parts / f"{stem}.parquet"
        if not path.is_file():
            return None
        try:
            meta = pq.read_schema(path).metadata or {}
            return json.loads(meta[_META_KEY])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            log.warning("%s: unreadable part (%s); the shard is embedded again", path, e)
            return None

    def part_done(self, stem: str, shard_sha256: str, fingerprint: str) -> bool:
        meta = self.part_meta(stem)
        return bool(meta and meta["shard_sha256"] == shard_sha256 and meta["model"] == fingerprint
                    and (self.parts / f"{stem}.npy").is_file())

    def commit_part(self, part: Part, fingerprint: str) -> None:
        """Vectors, then the rows whose metadata names them: the parquet's arrival commits the part."""
        data = npy_bytes(np.ascontiguousarray(part.vectors, dtype=np.float16))
        meta = {"shard": part.shard, "shard_sha256": part.shard_sha256, "model": fingerprint,
                "vectors_sha256": hashlib.sha256(data).hexdigest(), "rows": part.rows.num_rows,
                "failures": part.failures, "empty_segments": part.empty_segments}
        table = part.rows.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        atomic_write(self.parts / f"{part.stem}.npy", data)
        atomic_write(self.parts / f"{part.stem}.parquet", parquet_bytes(table))

    def load_part(self, stem: str) -> tuple[np.ndarray, pa.Table, dict[str, Any]]:
        meta = self.part_meta(stem)
        npy = self.parts / f"{stem}.npy"
        if meta is None or not npy.is_file():
            raise IndexFormatError(f"{self.parts}: part {stem} is missing")
        if sha256_file(npy) != meta["vectors_sha256"]:
            raise IndexFormatError(f"{npy}: does not match its row table (sha256); delete both "
                                   f"{stem}.npy and {stem}.parquet and rerun index")
        vectors = np.load(npy, allow_pickle=False)
        rows = pq.read_table(self.parts / f"{stem}.parquet").replace_schema_metadata(None)
        return vectors, rows, meta

    def finish(self, model: dict[str, Any], search: dict[str, Any], shards_dir: str,
               ann_bytes: bytes | None, vectors: np.ndarray, rows: pa.Table, parts: list[dict]) -> dict[str, Any]:
        """Write the finished files and, last, ``index.json``; returns its content."""
        (self.root / INDEX_JSON).unlink(missing_ok=True)
        files: dict[str, dict[str, Any]] = {}
        blobs = {VECTORS: npy_bytes(vectors), ROWS: parquet_bytes(rows)}
        (self.root / IVF).unlink(missing_ok=True)
        if ann_bytes is not None:
            blobs[IVF] = ann_bytes
        for name, data in blobs.items():
            atomic_write(self.root / name, data)
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        doc = {"format": FORMAT, "version": VERSION, "model": model, "shards_dir": shards_dir,
               "segments": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "search": search,
               "shards": parts, "files": files}
        atomic_write(self.root / INDEX_JSON, json.dumps(doc, indent=1).encode())
        return doc

    # -- reading a finished index ----------------------------------------------------------------
    def open(self, verify: bool = True) -> dict[str, Any]:
        """``index.json`` after checking that every file it lists is there, whole and unchanged."""
        if not self.root.is_dir():
            raise IndexFormatError(f"{self.root}: no such index directory")
        path = self.root / INDEX_JSON
        if not path.is_file():
            if (self.root / BUILD).is_file():
                raise IndexFormatError(f"{self.root}: unfinished index build (no {INDEX_JSON}); rerun "
                                       "`python -m evaluation index` with the same arguments to finish it")
            raise IndexFormatError(f"{self.root}: not a USE segment index (no {INDEX_JSON})")
        doc = self._read_json(path)
        for key in ("model", "segments", "dim", "search", "files"):
            if key not in doc:
                raise IndexFormatError(f"{path}: missing {key!r}")
        for name, info in doc["files"].items():
            f = self.root / name
            if not f.is_file():
                raise IndexFormatError(f"{f}: missing (listed in {INDEX_JSON})")
            if f.stat().st_size != info["bytes"]:
                raise IndexFormatError(f"{f}: {f.stat().st_size} bytes, {INDEX_JSON} says {info['bytes']} (truncated "
                                       "or replaced); rebuild with `python -m evaluation index ... --overwrite`")
            if verify and sha256_file(f) != info["sha256"]:
                raise IndexFormatError(f"{f}: content does not match its sha256 in {INDEX_JSON} (corrupt); rebuild "
                                       "with `python -m evaluation index ... --overwrite`")
        return doc
