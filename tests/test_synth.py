"""The synthetic dataset is deterministic, its annotations match its pixels, its captions parse."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

import shards
from pipeline import synth


def _digest(d) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path):
    a = synth.generate(tmp_path / "a", 4, seed=3)
    b = synth.generate(tmp_path / "b", 4, seed=3)
    c = synth.generate(tmp_path / "c", 4, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_annotations_match_pixels_and_labels(synth_dir):
    coco = COCO(str(synth_dir / "instances.json"))
    kinds = {type(a["segmentation"]).__name__ for a in coco.loadAnns(coco.getAnnIds())}
    assert kinds == {"list", "dict"}, "polygons and RLE both present"
    classes = json.loads((synth_dir / "semantic" / "classes.json").read_text())
    assert classes == list(synth.CLASSES)
    for img in coco.loadImgs(coco.getImgIds()):
        assert img["width"] != img["height"]
        pixels = np.asarray(Image.open(synth_dir / "images" / img["file_name"]))
        labels = np.asarray(Image.open(synth_dir / "semantic/annotations/validation" / img["file_name"]))
        assert pixels.shape[:2] == labels.shape == (img["height"], img["width"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert 2 <= len(anns) <= 4
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            assert m.sum() == a["area"] > 0
            assert (labels[m] == a["category_id"]).all()
            rgb = np.array(synth.SHAPES[a["category_id"] - 1].rgb)
            assert np.abs(pixels[m].mean(0) - rgb).max() < 12  # the class colour is painted there
        assert (labels > 0).sum() == sum(coco.annToMask(a).sum() for a in anns)


def test_captions_name_the_objects(synth_dir):
    caps = json.loads((synth_dir / "captions.json").read_text())["annotations"]
    coco = COCO(str(synth_dir / "instances.json"))
    for c in caps[:10]:
        names = {coco.cats[a["category_id"]]["name"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[c["image_id"]]))}
        assert any(n in c["caption"].lower() for n in names)


def test_synth_shards_fixture(synth_shards, synth_val_shards):
    keys = [s.key for s in shards.iter_samples(synth_shards)]
    assert len(keys) == 40 and len(set(keys)) == 40
    assert len(shards.list_shards(synth_shards)) == 5
    val = list(shards.iter_samples(synth_val_shards))
    assert len(val) == 24 and not set(keys) & {s.key for s in val}
    for s in val:
        assert all(seg.texts[0].text in synth.CLASSES for seg in s.meta.segments)
