"""COCO (and the synthetic dataset, which is COCO-format): instances and captions JSON.

Each instance annotation becomes a segment whose text is its category name (text source = the
dataset name, ``coco``), with the mask from any COCO segmentation (polygons, uncompressed RLE of
crowd regions, compressed RLE) converted exactly as pycocotools' ``annToMask`` does. Crowd regions
(``iscrowd: 1``, one mask over many instances) are skipped unless ``keep_crowd``, as detection and
segmentation training skip them: "person" on a crowd of people would teach one text for a group. Captions become
``record.captions`` for the phrase stage. Annotations and captions whose ``image_id`` is not in the
images list become one ``source`` failure per unknown image id; they are not dropped silently.

Planning streams the files (``schemas.stream``): images and categories first, then one annotation
at a time, validated (types, known category) and kept only as compact JSON text per image, so the
driver never holds the document as Python objects. Planning runs in the job's driver, so it does no
per-polygon work: the read task checks each segmentation against the image (:func:`check_segmentation`)
before pycocotools sees it. An annotation that could hurt a worker (non-finite or far-away
coordinates make pycocotools allocate without bound; RLE counts that do not cover the image make it
read past its buffer) fails its image there with the reason and the annotation's index in the file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.record import Record
from shards import make_key
from shards import rle as rle_utils
from shards.schema import Caption, Segment, Text

from .base import Source, SourceError, item
from .schemas import (
    CocoAnnotation,
    CocoCaption,
    CocoCategory,
    CocoImage,
    elements,
    json_file,
)

#: How far outside the image a polygon vertex may lie, as a fraction of the image's longer side, and
#: at least ``MIN_MARGIN`` pixels (annotation tools snap slightly outside; pycocotools rasterises the
#: whole outline, so distant vertices cost memory in proportion to their distance).
POLYGON_MARGIN = 0.25
MIN_MARGIN = 16
#: Longest polygon outline accepted, in multiples of the image's perimeter: pycocotools allocates
#: five points per pixel of outline, so a zig-zag of millions of vertices inside a small image
#: would still take gigabytes.
MAX_OUTLINE = 200


def check_segmentation(seg: Any, width: int, height: int) -> str | None:
    """Why a validated COCO ``segmentation`` cannot be rasterised safely at ``width x height``, or None."""
    if isinstance(seg, list):
        margin = max(POLYGON_MARGIN * max(width, height), MIN_MARGIN)
        outline = 0.0
        for i, poly in enumerate(seg):
            xy = np.asarray(poly, dtype=np.float64)
            if xy.size % 2:
                return f"polygon {i} has an odd number of coordinates ({xy.size})"
            if not np.isfinite(xy).all():
                return f"polygon {i} has a non-finite coordinate (NaN or infinity)"
            xy = xy.reshape(-1, 2)
            if ((xy < -margin) | (xy > np.array([width, height]) + margin)).any():
                return (f"polygon {i} has a vertex more than {POLYGON_MARGIN:g} x the image side outside "
                        f"the {width}x{height} image")
            if len(xy) > 1:
                outline += float(np.abs(np.diff(xy, axis=0, append=xy[:1])).max(axis=1).sum())
        if outline > MAX_OUTLINE * 2 * (width + height):
            return f"polygon outline is over {MAX_OUTLINE} x the image's perimeter"
        return None
    size = [int(v) for v in seg["size"]]
    if size != [height, width]:
        return f"RLE size {size} differs from the image size [{height}, {width}]"
    counts = seg["counts"]
    if isinstance(counts, str):
        if len(counts) > 8 * (height * width + 1):
            return "compressed RLE is longer than any RLE of this image"
        try:
            rle_utils.check({"size": size, "counts": counts})
        except ValueError as e:
            return f"bad compressed RLE: {e}"
        return None
    c = np.asarray(counts, dtype=np.int64)
    if (c < 0).any() or int(c.sum()) != height * width:
        return f"uncompressed RLE counts cover {int(c.sum())} pixels, the image has {height * width}"
    return None


class CocoSource(Source):
    kind = "coco"

    def __init__(self, name: str, images: str = "", annotations: str = "", captions: str = "",
                 limit: int = 0, keep_crowd: bool = False, **_: Any):
        super().__init__(name, images)
        if not annotations and not captions:
            raise SourceError("a COCO source needs source.annotations (instances JSON) or source.captions")
        self.require_images_dir()
        self.annotations, self.captions, self.limit = annotations, captions, limit
        self.keep_crowd = keep_crowd

    def plan(self) -> Iterator[dict[str, str]]:
        images: dict[str, tuple[str, int, int]] = {}
        anns: dict[str, list[str]] = defaultdict(list)  # image id -> compact JSON of each object
        caps: dict[str, list[str]] = defaultdict(list)
        if self.annotations:
            path = json_file(self.annotations, "COCO instances")
            self._add_images(images, path, "CocoInstances")
            cats = {c.id: c.name for _, c in elements(path, "categories", CocoCategory, "CocoInstances")}
            for i, a in elements(path, "annotations", CocoAnnotation, "CocoInstances"):
                if a.category_id not in cats:
                    raise SourceError(f"{path}: annotations[{i}].category_id {a.category_id} is not in categories")
                if a.iscrowd and not self.keep_crowd:
                    continue
                seg = a.segmentation if isinstance(a.segmentation, list) else a.segmentation.model_dump()
                anns[str(a.image_id)].append(json.dumps({"segmentation": seg, "name": cats[a.category_id], "i": i},
                                                        separators=(",", ":")))
        if self.captions:
            path = json_file(self.captions, "COCO captions")
            if not self.annotations:
                self._add_images(images, path, "CocoCaptions")
            for _, c in elements(path, "annotations", CocoCaption, "CocoCaptions"):
                if c.caption.strip():
                    caps[str(c.image_id)].append(c.caption.strip())
        ids = list(images)[: self.limit] if self.limit else list(images)
        head = json.dumps({"kind": self.kind, "source": self.name}, separators=(",", ":"))[:-1]
        for image_id in ids:
            file_name, w, h = images[image_id]
            rec = Record(source=self.name, image_id=image_id, width=w, height=h, file_name=file_name,
                         image_ext=file_name.rsplit(".", 1)[-1].lower(),
                         captions=[Caption(t, self.name) for t in caps.pop(image_id, [])])
            ann = f'{head},"objects":[{",".join(anns.pop(image_id, []))}]}}'
            yield item(make_key(self.name, image_id), file_name, rec, ann, root=self.images)
        for image_id in sorted((set(anns) | set(caps)) - set(images), key=str):
            rec = Record(source=self.name, image_id=image_id)
            n_a, n_c = len(anns.get(image_id, [])), len(caps.get(image_id, []))
            rec.fail("source", f"{n_a} annotations and {n_c} captions point to image id {image_id}, "
                               f"which is not in the images list")
            yield item(make_key(self.name, image_id), None, rec)

    @staticmethod
    def _add_images(images: dict[str, tuple[str, int, int]], path, file_model: str) -> None:
        for _, im in elements(path, "images", CocoImage, file_model):
            image_id = str(im.id)
            if image_id in images:
                raise SourceError(f"{path}: image id {image_id} is listed twice in images")
            images[image_id] = (im.file_name, im.width, im.height)

    @staticmethod
    def materialize(record: Record, ann: dict[str, Any]) -> None:
        """COCO segmentations to RLE segments at the annotated size; empty masks are dropped.

        Each segmentation is checked (:func:`check_segmentation`) before pycocotools rasterises it;
        the first refused one fails the image, naming its index in the annotation file."""
        objects = ann.get("objects", [])
        if not objects:
            return
        h, w = record.height, record.width
        rles = []
        for o in objects:
            reason = check_segmentation(o["segmentation"], w, h)
            if reason is not None:
                raise ValueError(f"annotations[{o.get('i', '?')}]: {reason}")
            rles.append(rle_utils.from_coco_segmentation(o["segmentation"], h, w))
        areas = rle_utils.area(rles)
        boxes = rle_utils.bbox(rles)
        for o, r, a, b in zip(objects, rles, areas, boxes, strict=True):
            if a == 0:
                continue
            record.segments.append(Segment(
                id=len(record.segments), rle=r, bbox=[float(v) for v in b], area=int(a),
                texts=[Text(o["name"], ann["source"], 1.0)], score=1.0))


