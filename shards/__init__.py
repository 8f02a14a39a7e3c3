"""The USE shard format: the contract between the curation pipeline and the trainer.

One webdataset sample per image (``KEY.json`` + the original ``KEY.jpg``/``.png``); see
``shards/SCHEMA.md``. This package imports none of the project's other packages.
"""

from .manifest import build_manifest, read_failures, read_manifest
from .reader import ShardSample, decode_sample, iter_samples, load_image, open_shards, shard_urls
from .schema import SCHEMA_VERSION, Caption, SampleMeta, SchemaError, Segment, Text, make_key
from .writer import ShardStats, ShardWriter, done_keys, list_shards, read_stats, recover

__all__ = [
    "SCHEMA_VERSION", "Caption", "SampleMeta", "SchemaError", "Segment", "Text", "make_key",
    "ShardWriter", "ShardStats", "done_keys", "list_shards", "read_stats", "recover",
    "build_manifest", "read_manifest", "read_failures",
    "ShardSample", "decode_sample", "iter_samples", "load_image", "open_shards", "shard_urls",
]
