"""A JSON summary of a shard directory: how much data, how it is distributed, where it came from.

The per-shard stats files hold everything needed (they are written with each shard), so a summary of
millions of samples reads a few KB per shard. A shard without a stats file (a crash between the
two renames, or shards written by another tool) is read through the safe reader instead. Nothing
here writes: a summary may run beside a job that is still writing (so no ``recover``). On object
storage (an ``s3://`` / ``gs://`` directory) only committed shards count: those whose stats object
exists, read concurrently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from . import storage
from .reader import iter_samples
from .writer import ShardStats, list_shards, read_stats, stats_path

log = logging.getLogger(__name__)


def summarize(directory: str | Path) -> dict[str, Any]:
    """Counts and distributions over every committed shard in ``directory``."""
    remote = storage.is_remote(directory)
    directory = str(directory) if remote else Path(directory)
    if not storage.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    tars = list_shards(directory)
    if remote:
        sizes = storage.listdir(directory)
        data = storage.read_many([stats_path(t) for t in tars])
    per_image: list[int] = []  # segments of each image
    n_texts = n_failures = n_bytes = 0
    text_sources: Counter = Counter()
    image_sources: Counter = Counter()
    without_stats = []
    for tar in tars:
        if not remote and not stats_path(tar).exists():
            without_stats.append(tar.name)
            log.warning("%s has no stats file; reading the tar", tar.name)
            for sample in iter_samples(tar, on_error="skip"):
                per_image.append(len(sample.meta.segments))
                image_sources[sample.meta.source] += 1
                for seg in sample.meta.segments:
                    n_texts += len(seg.texts)
                    text_sources.update(t.source for t in seg.texts)
            n_bytes += tar.stat().st_size
            continue
        stats = ShardStats(**json.loads(data[stats_path(tar)])) if remote else read_stats(tar)
        per_image.extend(int(k["segments"]) for k in stats.keys)
        image_sources.update(k["source"] for k in stats.keys)
        n_texts += stats.texts
        n_failures += len(stats.failures)
        n_bytes += sizes.get(storage.basename(tar), 0) if remote else tar.stat().st_size
        text_sources.update(stats.sources)
    n_segments = sum(per_image)
    return {
        "directory": str(directory),
        "shards": len(tars),
        "shards_without_stats": without_stats,
        "images": len(per_image),
        "segments": n_segments,
        "texts": n_texts,
        "failures": n_failures,
        "bytes": n_bytes,
        "segments_per_image": {
            "mean": round(n_segments / len(per_image), 4) if per_image else 0.0,
            "min": min(per_image, default=0),
            "max": max(per_image, default=0),
        },
        "texts_per_segment": {"mean": round(n_texts / n_segments, 4) if n_segments else 0.0},
        "text_sources": dict(text_sources.most_common()),
        "image_sources": dict(image_sources.most_common()),
    }
