"""COCO (and the synthetic dataset, which is COCO-format): instances and captions JSON.

Each instance annotation becomes a segment whose text is its category name (text source = the
dataset name, ``coco``), with the mask from any COCO segmentation (polygons, uncompressed RLE of
crowd regions, compressed RLE) converted exactly as pycocotools' ``annToMask`` does. Captions become
``record.captions`` for the phrase stage. Annotations and captions whose ``image_id`` is not in the
images list become one ``source`` failure per unknown image id; they are not dropped silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from pipeline.record import Record
from shards import make_key
from shards import rle as rle_utils

from .base import Source, SourceError, item
from .schemas import CocoCaptions, CocoInstances, load_json, validate


class CocoSource(Source):
    kind = "coco"

    def __init__(self, name: str, images: str = "", annotations: str = "", captions: str = "",
                 limit: int = 0, **_: Any):
        super().__init__(name, images)
        if not annotations and not captions:
            raise SourceError("a COCO source needs source.annotations (instances JSON) or source.captions")
        if self.images is None:
            raise SourceError("a COCO source needs source.images (the image directory)")
        self.annotations, self.captions, self.limit = annotations, captions, limit

    def plan(self) -> Iterator[dict[str, str]]:
        images: dict[str, dict[str, Any]] = {}
        anns: dict[str, list[dict[str, Any]]] = defaultdict(list)
        caps: dict[str, list[str]] = defaultdict(list)
        if self.annotations:
            inst = validate(load_json(self.annotations, "COCO instances"), CocoInstances, self.annotations)
            cats = {c.id: c.name for c in inst.categories}
            self._add_images(images, inst.images, self.annotations)
            for i, a in enumerate(inst.annotations):
                if a.category_id not in cats:
                    raise SourceError(f"{self.annotations}: annotations[{i}].category_id {a.category_id} "
                                      f"is not in categories")
                seg = a.segmentation if isinstance(a.segmentation, list) else a.segmentation.model_dump()
                anns[str(a.image_id)].append({"segmentation": seg, "name": cats[a.category_id]})
        if self.captions:
            capf = validate(load_json(self.captions, "COCO captions"), CocoCaptions, self.captions)
            if not self.annotations:
                self._add_images(images, capf.images, self.captions)
            for c in capf.annotations:
                caps[str(c.image_id)].append(c.caption.strip())
        ids = list(images)[: self.limit] if self.limit else list(images)
        for image_id in ids:
            im = images[image_id]
            rec = Record(source=self.name, image_id=image_id, width=im["width"], height=im["height"],
                         file_name=im["file_name"], image_ext=im["file_name"].rsplit(".", 1)[-1].lower(),
                         captions=[{"text": t, "source": self.name} for t in caps.get(image_id, []) if t])
            ann = {"kind": self.kind, "source": self.name, "objects": anns.get(image_id, [])}
            yield item(make_key(self.name, image_id), self.images / im["file_name"], rec, ann)
        for image_id in sorted(set(anns) | set(caps), key=str):
            if image_id in images:
                continue
            rec = Record(source=self.name, image_id=image_id)
            n_a, n_c = len(anns.get(image_id, [])), len(caps.get(image_id, []))
            rec.fail("source", f"{n_a} annotations and {n_c} captions point to image id {image_id}, "
                               f"which is not in the images list")
            yield item(make_key(self.name, image_id), None, rec)

    @staticmethod
    def _add_images(images: dict[str, dict[str, Any]], entries: list, path: str) -> None:
        for im in entries:
            image_id = str(im.id)
            if image_id in images:
                raise SourceError(f"{path}: image id {image_id} is listed twice in images")
            images[image_id] = {"file_name": im.file_name, "width": im.width, "height": im.height}

    @staticmethod
    def materialize(record: Record, ann: dict[str, Any]) -> None:
        """COCO segmentations to RLE segments at the annotated size; empty masks are dropped."""
        objects = ann.get("objects", [])
        if not objects:
            return
        h, w = record.height, record.width
        rles = []
        for o in objects:
            r = rle_utils.from_coco_segmentation(o["segmentation"], h, w)
            if list(r["size"]) != [h, w]:
                raise ValueError(f"RLE size {r['size']} differs from the image size [{h}, {w}]")
            rles.append(r)
        areas = rle_utils.area(rles)
        boxes = rle_utils.bbox(rles)
        for o, r, a, b in zip(objects, rles, areas, boxes, strict=True):
            if a == 0:
                continue
            record.segments.append({
                "id": len(record.segments), "rle": r, "bbox": [float(v) for v in b], "area": int(a),
                "texts": [{"text": o["name"], "source": ann["source"], "score": 1.0}], "score": 1.0,
            })
