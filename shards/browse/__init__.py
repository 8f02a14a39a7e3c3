"""A static, self-contained shard browser (``python -m shards browse DIR --out SITE``); see :mod:`.site`."""
