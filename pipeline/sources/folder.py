"""A plain image folder: every image file under a directory tree, no annotations.

The image id is the file's path relative to the folder (so keys are stable across machines);
sizes come from the image itself when it is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from pipeline.record import Record
from shards import make_key, storage

from .base import Source, item


class FolderSource(Source):
    kind = "folder"

    def __init__(self, name: str, images: str = "", extensions: list[str] | None = None, limit: int = 0,
                 **_: Any):
        super().__init__(name, images)
        self.require_images_dir()
        self.extensions = {e.lower() if e.startswith(".") else f".{e.lower()}"
                           for e in (extensions or [".jpg", ".jpeg", ".png", ".webp"])}
        self.limit = limit

    def plan(self) -> Iterator[dict[str, str]]:
        if isinstance(self.images, str):
            yield from self._plan_objects()
            return
        n = 0
        for path in sorted(self.images.rglob("*")):
            if path.suffix.lower() not in self.extensions or not path.is_file():
                continue
            rel = path.relative_to(self.images).as_posix()
            rec = Record(source=self.name, image_id=rel, file_name=rel,
                         image_ext=path.suffix.lstrip(".").lower())
            yield item(make_key(self.name, rel), rel, rec, root=self.images)
            n += 1
            if self.limit and n >= self.limit:
                return

    def _plan_objects(self) -> Iterator[dict[str, str]]:
        """An ``s3://`` / ``gs://`` prefix: one recursive listing (every key is a file), sorted."""
        n = 0
        for rel in storage.files_under(self.images):
            suffix = PurePosixPath(rel).suffix.lower()
            if suffix not in self.extensions:
                continue
            rec = Record(source=self.name, image_id=rel, file_name=rel, image_ext=suffix.lstrip("."))
            yield item(make_key(self.name, rel), rel, rec, root=self.images)
            n += 1
            if self.limit and n >= self.limit:
                return
