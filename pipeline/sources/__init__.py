"""Image sources of the curation job, by name: ``coco`` (also the synthetic dataset), ``vg``, ``folder``.

``make_source(config.source)`` builds one; ``Source.plan()`` validates annotations in the driver
and yields light items, ``read_item`` (in Ray tasks) reads each image once and fills the record.
"""

from __future__ import annotations

from typing import Any

from .base import ReadError, Source, SourceError, probe, read_item
from .coco import CocoSource
from .folder import FolderSource
from .vg import VgSource

SOURCES: dict[str, type[Source]] = {s.kind: s for s in (CocoSource, VgSource, FolderSource)}


def make_source(cfg: Any) -> Source:
    """A source from a ``SourceConfig`` (or anything with the same attributes)."""
    if cfg.kind not in SOURCES:
        raise SourceError(f"unknown source kind {cfg.kind!r}; known: {sorted(SOURCES)}")
    return SOURCES[cfg.kind](name=cfg.name or cfg.kind, images=cfg.images, annotations=cfg.annotations,
                             captions=cfg.captions, regions=cfg.regions, extensions=cfg.extensions,
                             limit=cfg.limit, keep_crowd=cfg.keep_crowd)


__all__ = ["SOURCES", "CocoSource", "FolderSource", "ReadError", "Source", "SourceError", "VgSource",
           "make_source", "probe", "read_item"]
