"""Querying a finished segment index by text or by one of its segments.

A text query goes through the frozen CLIP text tower of the model the index was built with (its
fingerprint is checked: a query embedded by another model would rank nonsense); a segment query uses
the stored vector of that segment and leaves the segment itself out of its hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from . import ann
from .build import model_identity
from .embed import load_model
from .store import IVF, ROWS, VECTORS, IndexFormatError, IndexStore


@dataclass
class Hit:
    rank: int
    score: float
    shard: str
    key: str
    segment_id: int
    bbox: list[float]
    area: int
    texts: list[dict[str, Any]]
    row: int

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": round(self.score, 6), "shard": self.shard, "key": self.key,
                "segment_id": self.segment_id, "bbox": self.bbox, "area": self.area, "texts": self.texts}


class SegmentIndex:
    """A finished index opened for search (vectors memory-mapped; float32 copy only for exact search)."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.store = IndexStore(root)
        self.meta = self.store.open(verify=verify)
        root = self.store.root
        try:
            self.vectors = np.load(root / VECTORS, mmap_mode="r", allow_pickle=False)
            self.rows = pq.read_table(root / ROWS)
        except (ValueError, OSError) as e:
            raise IndexFormatError(f"{root}: unreadable index files ({e})") from e
        n, d = self.meta["segments"], self.meta["dim"]
        if self.vectors.dtype != np.float16 or self.vectors.shape != (n, d) or self.rows.num_rows != n:
            raise IndexFormatError(f"{root}: {VECTORS} is {self.vectors.dtype} {self.vectors.shape} with "
                                   f"{self.rows.num_rows} rows; index.json says float16 ({n}, {d})")
        self._dense: np.ndarray | None = None
        self._ivf = None
        if self.meta["search"]["kind"] == "ivf":
            self._ivf = ann.ivf_from_bytes((root / IVF).read_bytes(), int(self.meta["search"]["nprobe"]))
        self._keys: dict[tuple[str, int], int] | None = None

    def __len__(self) -> int:
        return int(self.meta["segments"])

    @property
    def kind(self) -> str:
        return self.meta["search"]["kind"]

    def set_nprobe(self, nprobe: int) -> None:
        if self._ivf is not None:
            ann.faiss.extract_index_ivf(self._ivf).nprobe = nprobe

    def search_vectors(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores and row ids ``[Q, k]`` (ids -1 where fewer than ``k`` exist)."""
        if self._ivf is not None and not exact:
            return ann.ann_search(self._ivf, queries, k)
        if self._dense is None:
            self._dense = np.asarray(self.vectors, dtype=np.float32)
        return ann.exact_search(self._dense, queries, k)

    def hits(self, scores: np.ndarray, ids: np.ndarray, skip: int | None = None, k: int | None = None) -> list[Hit]:
        out: list[Hit] = []
        cols = self.rows.select(["shard", "key", "segment_id", "bbox", "area", "texts"])
        for s, i in zip(scores.tolist(), ids.tolist(), strict=True):
            if i < 0 or i == skip:
                continue
            r = cols.slice(i, 1).to_pylist()[0]
            out.append(Hit(rank=len(out) + 1, score=float(s), shard=r["shard"], key=r["key"],
                           segment_id=int(r["segment_id"]), bbox=[round(float(v), 2) for v in r["bbox"]],
                           area=int(r["area"]), texts=r["texts"], row=int(i)))
            if k is not None and len(out) == k:
                break
        return out

    def row_of(self, key: str, segment_id: int) -> int:
        if self._keys is None:
            self._keys = {(k, int(s)): i for i, (k, s) in enumerate(zip(self.rows["key"].to_pylist(),
                                                                          self.rows["segment_id"].to_pylist(), strict=True))}
        if (key, segment_id) not in self._keys:
            raise KeyError(f"{self.store.root}: no segment {key}:{segment_id} in the index")
        return self._keys[(key, segment_id)]

    def query_segment(self, key: str, segment_id: int, k: int = 10) -> list[Hit]:
        """Segments most like ``key:segment_id`` (itself excluded)."""
        row = self.row_of(key, segment_id)
        scores, ids = self.search_vectors(np.asarray(self.vectors[row], dtype=np.float32)[None], k + 1)
        return self.hits(scores[0], ids[0], skip=row, k=k)


class TextQuery:
    """The text side: the index's model (or ``checkpoint``, which must be the same model) loaded once."""

    def __init__(self, index: SegmentIndex, checkpoint: str | None = None, device: str | None = None):
        expected = index.meta["model"]
        checkpoint = checkpoint or expected["checkpoint"]
        found = model_identity(checkpoint)
        if found["fingerprint"] != expected["fingerprint"]:
            raise IndexFormatError(f"{checkpoint}: not the model {index.store.root} was built with (fingerprint "
                                   f"{found['fingerprint'][:12]}, index has {expected['fingerprint'][:12]} from "
                                   f"{expected['checkpoint']})")
        self.index = index
        self.model = load_model(checkpoint, device)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(texts).float().cpu().numpy()

    def __call__(self, text: str, k: int = 10) -> list[Hit]:
        scores, ids = self.index.search_vectors(self.embed([text]), k)
        return self.index.hits(scores[0], ids[0])
