"""Visual Genome: ``image_data.json`` + ``region_descriptions.json`` -> box-phrase prompts for SAM.

Region boxes are given as ``x, y, width, height`` in the stored image's pixels; they become
``record.boxes`` (``xyxy`` absolute, clipped to the image, phrase as text, source = dataset name)
that the segmenter turns into masks. Image files are found under ``images/`` either flat or in the
release's ``VG_100K/`` and ``VG_100K_2/`` folders (the folder is taken from the image URL).

Both files are streamed (``schemas.stream``): the regions of each image are kept as compact JSON
text, and a region with a non-finite number fails its image at planning time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from pipeline.record import Box, Record
from shards import make_key, storage

from .base import Source, SourceError, item
from .schemas import VgImage, VgImageRegions, elements, json_file


class VgSource(Source):
    kind = "vg"

    def __init__(self, name: str, images: str = "", annotations: str = "", regions: str = "",
                 limit: int = 0, **_: Any):
        super().__init__(name, images)
        if self.images is None or not annotations or not regions:
            raise SourceError("a VG source needs source.images, source.annotations (image_data.json) "
                              "and source.regions (region_descriptions.json)")
        self.require_images_dir()
        self.annotations, self.regions, self.limit = annotations, regions, limit

    def plan(self) -> Iterator[dict[str, str]]:
        images_path = json_file(self.annotations, "VG image_data")
        regions_path = json_file(self.regions, "VG region_descriptions")
        by_image: dict[str, list[str]] = {}  # image id -> compact JSON of each region
        bad: dict[str, str] = {}
        for i, r in elements(regions_path, "", VgImageRegions, "VG region_descriptions"):
            image_id = str(r.image_id)
            regions = by_image.setdefault(image_id, [])
            for j, g in enumerate(r.regions):
                if not all(math.isfinite(v) for v in (g.x, g.y, g.width, g.height)):
                    bad.setdefault(image_id, f"[{i}].regions[{j}] has a non-finite coordinate")
                regions.append(json.dumps({"phrase": g.phrase, "x": g.x, "y": g.y, "w": g.width, "h": g.height},
                                          separators=(",", ":")))
        nested = any(storage.isdir(storage.join(self.images, d)) for d in ("VG_100K", "VG_100K_2"))
        seen: set[str] = set()
        head = json.dumps({"kind": self.kind, "source": self.name}, separators=(",", ":"))[:-1]
        for _, im in elements(images_path, "", VgImage, "VG image_data"):
            image_id = str(im.image_id)
            if image_id in seen:
                raise SourceError(f"{self.annotations}: image id {image_id} is listed twice")
            seen.add(image_id)
            if self.limit and len(seen) > self.limit:
                continue
            url = PurePosixPath(im.url) if im.url else PurePosixPath(f"{image_id}.jpg")
            rel = f"{url.parent.name}/{url.name}" if nested and url.parent.name else url.name
            rec = Record(source=self.name, image_id=image_id, width=im.width, height=im.height,
                         file_name=rel, image_ext=url.suffix.lstrip(".").lower() or "jpg")
            if image_id in bad:
                rec.fail("source", f"bad region for image {image_id}: {bad[image_id]}")
            ann = f'{head},"regions":[{",".join(by_image.pop(image_id, []))}]}}'
            yield item(make_key(self.name, image_id), rel, rec, ann, root=self.images)
        for image_id in sorted(set(by_image) - seen):
            rec = Record(source=self.name, image_id=image_id)
            rec.fail("source", f"{len(by_image[image_id])} regions point to image id {image_id}, "
                               f"which is not in {self.annotations}")
            yield item(make_key(self.name, image_id), None, rec)

    @staticmethod
    def materialize(record: Record, ann: dict[str, Any]) -> None:
        w, h = record.width, record.height
        for g in ann.get("regions", []):
            text = " ".join(str(g["phrase"]).split())
            x0, y0 = max(0.0, float(g["x"])), max(0.0, float(g["y"]))
            x1, y1 = min(float(w), float(g["x"]) + float(g["w"])), min(float(h), float(g["y"]) + float(g["h"]))
            if text and x1 - x0 >= 1 and y1 - y0 >= 1:
                record.boxes.append(Box(xyxy=[x0, y0, x1, y1], text=text, source=ann["source"]))
