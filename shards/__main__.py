"""``python -m shards``: validate, summarize and inspect shard directories (see :mod:`shards.cli`)."""

from .cli import main

raise SystemExit(main())
