"""The USE shard format: the contract between the curation pipeline and the trainer.

One webdataset sample per image (``KEY.json`` + the original ``KEY.jpg``/``.png``); see
``shards/SCHEMA.md``. This package imports none of the project's other packages.

Names are imported lazily (PEP 562): ``webdataset`` imports torch, which costs seconds in every Ray
worker that only needs ``shards.rle`` or ``shards.schema``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "image": ("DEFAULT_POLICY", "ImageDecodeError", "ReadPolicy", "decode_image", "decode_rgb_array"),
    "manifest": ("build_manifest", "read_failures", "read_manifest"),
    "reader": ("ShardSample", "decode_sample", "iter_samples", "load_image", "open_shards", "shard_urls"),
    "schema": ("SCHEMA_VERSION", "Caption", "SampleMeta", "SchemaError", "Segment", "Text", "make_key"),
    "writer": ("ShardStats", "ShardWriter", "done_keys", "failure_records", "list_shards", "read_stats", "recover"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
