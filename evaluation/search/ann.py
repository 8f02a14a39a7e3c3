"""Nearest neighbours by inner product (cosine on unit vectors): exact below a size, faiss IVF above.

Exact search is one float32 matmul and an ``argpartition`` (numpy); the approximate index is faiss
``IndexIVFFlat`` with a flat inner-product coarse quantizer (why: :mod:`evaluation.search.config`).
faiss files are faiss's own binary format (no pickle); the index's manifest checks their sha256
before faiss reads them.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from .config import IVFConfig


def default_nlist(n: int) -> int:
    """``sqrt(n)`` rounded to a power of two, at least 16 (faiss's rule of thumb is 4-16 * sqrt(n) for
    very large sets; fewer lists keep the build's k-means and assignment cheap on CPUs)."""
    return max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))


def build_ivf(vectors: np.ndarray, cfg: IVFConfig) -> faiss.Index:
    """Train (k-means on a seeded sample) and fill an IVF index with ``vectors`` (float32 [N, D], unit)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    nlist = min(cfg.nlist or default_nlist(n), n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    quantizer.this.disown()  # the IVF index owns (and frees) its quantizer: faiss's documented pattern
    index.own_fields = True
    index.cp.niter = cfg.kmeans_iters
    index.cp.seed = cfg.seed
    rng = np.random.default_rng(cfg.seed)
    sample = x if n <= nlist * cfg.train_per_list else x[np.sort(rng.choice(n, nlist * cfg.train_per_list, replace=False))]
    index.train(sample)
    index.add(x)
    index.nprobe = cfg.nprobe
    return index


def ivf_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def ivf_from_bytes(data: bytes, nprobe: int) -> faiss.Index:
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` by inner product: scores and ids ``[Q, k]``, best first (ids -1 past the end)."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    scores = q @ vectors.T if vectors.dtype == np.float32 else q @ vectors.astype(np.float32).T
    n = scores.shape[1]
    k_eff = min(k, n)
    if k_eff == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff] if k_eff < n else np.tile(np.arange(n), (len(q), 1))
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
    ids = np.take_along_axis(top, order, 1)
    best = np.take_along_axis(scores, ids, 1)
    if k_eff < k:
        pad = k - k_eff
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
    return best.astype(np.float32), ids.astype(np.int64)


def ann_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = index.search(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32), k)
    return scores, ids
