"""Typed settings of ``python -m evaluation index`` (``key=value`` overrides, optional YAML file).

Search kind: exact (a float32 matmul over every vector) up to ``flat_max`` segments, where it answers
a query in milliseconds and needs no training; above it an inverted-file index (faiss ``IndexIVFFlat``,
inner product, exact float32 vectors in ``nlist`` k-means cells; a query scans the ``nprobe`` nearest
cells). Why IVF and not an HNSW graph (faiss ``IndexHNSWFlat``, hnswlib, usearch): at a million 768-d
vectors an HNSW build is tens of minutes of one-vector-at-a-time distance work on a small machine,
while IVF costs one k-means on a sample plus one assignment matmul per vector (BLAS: ~35 s for 1M on 2
cores), keeps no per-vector graph, and trades recall for speed at query time with one number
(``nprobe``, also ``query --nprobe``). A flat coarse quantizer measured faster than an HNSW one at
these list counts, for both building and searching. Figures: ``BENCHMARKS.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shards import overrides


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class IVFConfig(_Strict):
    """The approximate index used above ``flat_max`` segments."""

    nlist: int | None = Field(None, ge=1, description="inverted lists; null: sqrt(N) rounded to a power of two "
                                                      "(1024 at 1M)")
    nprobe: int = Field(2, ge=1, description="lists scanned per query (recall against speed; query --nprobe)")
    train_per_list: int = Field(20, ge=1, description="k-means training sample: this many vectors per list "
                                                      "(faiss asks for 39; 20 measured as good on 1M and halves the cost)")
    kmeans_iters: int = Field(8, ge=1, description="k-means iterations")
    seed: int = Field(0, description="training sample and k-means seed (the build is reproducible)")


class RayIndexConfig(_Strict):
    """Where shards are embedded: Ray Data actors (one model load per actor) or this process."""

    mode: Literal["auto", "ray", "local"] = Field(
        "auto", description="auto: Ray when ray.address or RAY_ADDRESS names a cluster, else in this process; "
                            "ray: always Ray (a local one when no address); local: never (not on/off: YAML "
                            "reads those as booleans)")
    address: str = Field("", description="cluster to join; empty: RAY_ADDRESS")
    num_actors: int = Field(1, ge=1, description="embedding actors (one per GPU on a GPU cluster)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (set explicitly: see TINY_MODELS.md)")
    local_num_cpus: int | None = Field(None, description="local Ray only: CPUs to offer (null: detect)")


class IndexConfig(_Strict):
    device: str | None = Field(None, description="model device; null: cuda if available, else cpu")
    batch_size: int = Field(16, ge=1, description="images per backbone forward (batches never cross a shard, so a "
                                                  "shard's vectors do not depend on what else is indexed)")
    flat_max: int = Field(100_000, ge=0, description="at most this many segments: exact search, no ANN index")
    ivf: IVFConfig = IVFConfig()
    ray: RayIndexConfig = RayIndexConfig()
    html_max_segments: int = Field(20_000, ge=0, description="query --html exports the vectors for the browser "
                                                             "only up to this many segments")

    @classmethod
    def load(cls, path: str | Path | None = None, assignments: list[str] | tuple[str, ...] = ()) -> IndexConfig:
        """Defaults, or ``path`` (YAML), then ``key=value`` overrides; unknown keys named with their origin."""
        if path:
            return overrides.load_yaml(path, cls, assignments)
        return cls.model_validate(overrides.apply({}, assignments, cls))
