"""Write shards of the synthetic dataset straight from its COCO annotations (test data only).

The pipeline's COCO source does the same through Ray; tests of the trainer and of the shard tools
use this direct path so that they do not depend on the curation job.
"""

from __future__ import annotations

import json
from pathlib import Path

import shards
from shards import rle


def write_synth_shards(synth_dir: Path, out_dir: Path, image_ids: list[int] | None = None,
                       max_samples: int = 8) -> Path:
    coco = json.loads((synth_dir / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    caps: dict[int, list[str]] = {}
    for c in json.loads((synth_dir / "captions.json").read_text())["annotations"]:
        caps.setdefault(c["image_id"], []).append(c["caption"])
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    wanted = set(image_ids) if image_ids is not None else None
    with shards.ShardWriter(out_dir, prefix="synth", max_samples=max_samples) as writer:
        for img in coco["images"]:
            if wanted is not None and img["id"] not in wanted:
                continue
            h, w = img["height"], img["width"]
            rles = [rle.from_coco_segmentation(a["segmentation"], h, w) for a in anns.get(img["id"], [])]
            areas, boxes = rle.area(rles), rle.bbox(rles)
            segments = [
                shards.Segment(id=k, rle=r, bbox=[float(v) for v in boxes[k]], area=int(areas[k]),
                               texts=[shards.Text(names[a["category_id"]], "synth", 1.0)])
                for k, (r, a) in enumerate(zip(rles, anns.get(img["id"], []), strict=True))
            ]
            meta = shards.SampleMeta(
                key=shards.make_key("synth", img["id"]), image_id=str(img["id"]), source="synth", width=w,
                height=h, image_ext="png", file_name=img["file_name"],
                captions=[shards.Caption(t, "synth") for t in caps.get(img["id"], [])], segments=segments)
            writer.write(meta, (synth_dir / "images" / img["file_name"]).read_bytes())
    shards.build_manifest(out_dir)
    return out_dir
