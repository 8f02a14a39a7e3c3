"""``python -m pipeline`` (see :mod:`pipeline.cli`)."""

from pipeline.cli import main

raise SystemExit(main())
