"""Shards for the read and trainer benchmarks: the COCO val2017 sample, or the synthetic set without it.

Written straight from the COCO annotations with :class:`shards.ShardWriter` (category names as the
segments' texts, captions kept), which is what the annotation path of a curation job writes for
these images; real 640x480 JPEGs make decode and RLE costs realistic. When ``../shared/data`` is
absent the synthetic dataset (``pipeline.synth``) stands in and the Markdown says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import shards
from shards import rle

ROOT = Path(__file__).resolve().parents[1]
COCO = Path(os.environ.get("USE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "coco2017_val_subset"


def _coco_files(tmp: Path) -> tuple[str, Path, Path, Path | None]:
    """(description, images dir, instances JSON, captions JSON) of the COCO sample or the synthetic set."""
    if COCO.is_dir():
        ann = COCO / "annotations"
        return "COCO val2017 sample", COCO / "val2017", ann / "instances_val2017.json", ann / "captions_val2017.json"
    from pipeline import synth

    d = synth.generate(tmp / "synth", 40, seed=0)
    return "synthetic dataset", d / "images", d / "instances.json", d / "captions.json"


def sample_shards(tmp: Path, max_samples: int = 8, limit: int | None = None) -> tuple[str, Path, int, int]:
    """Write shards under ``tmp/shards``; returns (description, shard dir, samples, segments)."""
    name, images, instances, captions = _coco_files(tmp)
    coco = json.loads(instances.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    caps: dict[int, list[str]] = {}
    if captions is not None and captions.is_file():
        for c in json.loads(captions.read_text())["annotations"]:
            caps.setdefault(c["image_id"], []).append(c["caption"])
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            anns.setdefault(a["image_id"], []).append(a)
    out = tmp / "shards"
    n = n_seg = 0
    with shards.ShardWriter(out, prefix="bench", max_samples=max_samples) as writer:
        for img in coco["images"][:limit]:
            h, w = img["height"], img["width"]
            these = anns.get(img["id"], [])
            if not these:
                continue
            rles = [rle.from_coco_segmentation(a["segmentation"], h, w) for a in these]
            areas, boxes = rle.area(rles), rle.bbox(rles)
            segments = [shards.Segment(id=k, rle=r, bbox=[float(v) for v in boxes[k]], area=int(areas[k]),
                                       texts=[shards.Text(names[a["category_id"]], "coco", 1.0)])
                        for k, (r, a) in enumerate(zip(rles, these, strict=True))]
            ext = Path(img["file_name"]).suffix.lstrip(".").lower() or "jpg"
            meta = shards.SampleMeta(key=shards.make_key("coco", img["id"]), image_id=str(img["id"]), source="coco",
                                     width=w, height=h, image_ext="jpg" if ext == "jpeg" else ext,
                                     file_name=img["file_name"],
                                     captions=[shards.Caption(t, "coco") for t in caps.get(img["id"], [])],
                                     segments=segments)
            writer.write(meta, (images / img["file_name"]).read_bytes())
            n += 1
            n_seg += len(segments)
    shards.build_manifest(out)
    return f"{name} ({n} images, {n_seg} segments)", out, n, n_seg
