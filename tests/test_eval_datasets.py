"""evaluation.datasets: each loader on a tiny tree in its real encoding, the prepare steps, the real ADE sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from evaluation.datasets import IGNORE, DatasetError, open_dataset
from evaluation.datasets.prepare import ade847_resize_shape, prepare
from pipeline import synth


def _jpg(path, h, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _label(path, array, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def test_ade150_raw_and_detectron2_forms(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150], [2, 2, 0]], np.uint8)
    _jpg(root / "images/validation/ADE_val_00000001.jpg", 2, 3)
    _jpg(root / "images/validation/ADE_val_00000002.jpg", 2, 3)  # no label: left out like load_sem_seg
    _label(root / "annotations/validation/ADE_val_00000001.png", raw)
    ds = open_dataset("ade20k-150", root)
    assert ds.layout == "sceneparsing" and ds.num_classes == 150 and [s.key for s in ds.samples] == ["ADE_val_00000001"]
    assert ds.load_label(ds.samples[0]).tolist() == [[IGNORE, 0, 149], [1, 1, IGNORE]]
    assert ds.classes.names[0] == "wall" and "brick wall" in ds.classes.vocabulary("synonyms")[0]
    # CAT-Seg's prepare_ade20k_150.py: img - 1 (0 -> 255); the loader then prefers that form
    assert prepare("ade20k-150", root) == 1
    d2 = np.asarray(Image.open(root / "annotations_detectron2/validation/ADE_val_00000001.png"))
    assert d2.tolist() == [[255, 0, 149], [1, 1, 255]]
    ds2 = open_dataset("ade20k-150", tmp_path)  # the parent folder works too (DETECTRON2_DATASETS)
    assert ds2.layout == "detectron2" and ds2.load_label(ds2.samples[0]).tolist() == ds.load_label(ds.samples[0]).tolist()
    pred = np.array([[3, 0, 149], [1, 1, 7]])
    saved = ds.encoding.save(pred, tmp_path / "p")
    assert np.asarray(Image.open(saved)).tolist() == (pred + 1).tolist()  # the raw release's own encoding


def test_ade847_prepare_and_loader(tmp_path):
    src = tmp_path / "ADE20K_2021_17_01"
    folder = src / "images/ADE/validation/urban/street"
    h, w = 600, 700  # both sides > 512: resized to 512 x 597 like CAT-Seg
    _jpg(folder / "ADE_val_00000009.jpg", h, w)
    seg = np.zeros((h, w, 3), np.uint8)
    seg[:, :350] = [10, 56, 1]         # code (10/10)*256 + 56 = 312: "building, edifice" -> train id 1
    seg[:300, 350:] = [110, 162, 2]    # code 11*256 + 162 = 2978: "wall" -> 0
    seg[300:, 350:] = [0, 5, 0]        # code 5: not one of the 847 -> 65535
    _label(folder / "ADE_val_00000009_seg.png", seg)
    assert prepare("ade20k-847", src) == 1
    ds = open_dataset("ade20k-847", src)
    assert ds.num_classes == 847 and ds.encoding.suffix == ".tif"
    stored = np.asarray(Image.open(ds.samples[0].label))
    assert stored.dtype == np.uint16 and stored.shape == (512, 597) == ade847_resize_shape(h, w)
    assert Image.open(ds.samples[0].image).size == (597, 512)
    labels = ds.load_label(ds.samples[0])
    assert labels[0, 0] == 1 and labels[0, -1] == 0 and labels[-1, -1] == IGNORE and set(np.unique(labels)) == {IGNORE, 0, 1}
    assert ds.classes.names[1] == "building, edifice"
    assert ade847_resize_shape(400, 900) is None  # one side <= 512: kept


def test_pc59_prepare_and_loader(tmp_path):
    src = tmp_path / "VOCdevkit/VOC2010"
    h, w = 4, 5
    _jpg(src / "JPEGImages/2008_000002.jpg", h, w)
    _jpg(src / "JPEGImages/2008_000003.jpg", h, w)
    from pycocotools import mask as mask_utils

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": r["size"], "counts": r["counts"].decode()}
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[:2] = True   # category 2 (aeroplane) -> 0
    b[2:, :2] = True  # category 1 (not in the 59) -> 255
    c = np.zeros((h, w), bool)
    c[3, 4] = True  # category 458 (wood, the largest of the 59 ids) -> 58
    (src / "trainval_merged.json").write_text(json.dumps({
        "images": [{"image_id": 1, "file_name": "2008_000002.jpg", "height": h, "width": w, "phase": "val"},
                   {"image_id": 2, "file_name": "2008_000003.jpg", "height": h, "width": w, "phase": "val"},
                   {"image_id": 3, "file_name": "2008_000004.jpg", "height": h, "width": w, "phase": "train"}],
        "annos_segmentation": [{"image_id": 1, "category_id": 2, "segmentation": rle(a)},
                               {"image_id": 1, "category_id": 1, "segmentation": rle(b)},
                               {"image_id": 1, "category_id": 458, "segmentation": rle(c)}]}))
    assert prepare("pc-59", src) == 1  # image 2 has no annotation, image 3 is train
    ds = open_dataset("pc-59", tmp_path)
    assert ds.num_classes == 59 and [s.key for s in ds.samples] == ["2008_000002"]
    labels = ds.load_label(ds.samples[0])
    assert (labels[:2] == 0).all() and (labels[2:, :2] == IGNORE).all() and labels[3, 4] == 58 and labels[2, 3] == IGNORE
    assert ds.classes.names[58] == "wood"


def test_pc459_prepare_and_loader(tmp_path):
    src = tmp_path / "VOCdevkit/VOC2010"
    _jpg(src / "JPEGImages/2008_000002.jpg", 3, 4)
    label_map = np.array([[1, 2, 3, 459], [431, 431, 5, 6], [1, 1, 1, 1]], np.uint16)
    (src / "trainval").mkdir(parents=True)
    scipy.io.savemat(src / "trainval/2008_000002.mat", {"LabelMap": label_map})
    (src / "pascalcontext_val.txt").write_text("2008_000002\n2008_000099\n")
    assert prepare("pc-459", src) == 1
    ds = open_dataset("pc-459", src)
    labels = ds.load_label(ds.samples[0])
    assert ds.num_classes == 459 and labels.tolist() == (label_map.astype(int) - 1).tolist()
    assert ds.classes.names[430] == "unknown" and labels[1, 0] == 430  # "unknown" is a class, not ignore
    stored = (label_map - 1).astype(np.uint16)
    stored[0, 0] = 65535
    _label(ds.samples[0].label, stored, "TIFF")
    assert ds.load_label(ds.samples[0])[0, 0] == IGNORE  # the defensive ignore value


def test_voc20_prepare_and_loader(tmp_path):
    src = tmp_path / "VOCdevkit/VOC2012"
    _jpg(src / "JPEGImages/2007_000033.jpg", 2, 3)
    _label(src / "SegmentationClassAug/2007_000033.png", np.array([[0, 1, 20], [255, 15, 0]], np.uint8))
    _label(src / "SegmentationClassAug/2007_000042.png", np.array([[0, 255]], np.uint8))  # no class: not written
    (src / "ImageSets/Segmentation").mkdir(parents=True)
    (src / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000042\n")
    assert prepare("voc-20", src) == 1
    ds = open_dataset("voc-20", src)
    assert ds.num_classes == 20 and ds.load_label(ds.samples[0]).tolist() == [[IGNORE, 0, 19], [IGNORE, 14, IGNORE]]


def test_synth_loader(tmp_path):
    out = synth.generate(tmp_path / "synth", 3, seed=1)
    for root in (out, out / "semantic"):
        ds = open_dataset("synth", root)
        assert ds.num_classes == 6 and len(ds.samples) == 3 and ds.classes.names[0] == "red circle"
        labels = ds.load_label(ds.samples[0])
        raw = np.asarray(Image.open(ds.samples[0].label))
        assert (labels[raw == 0] == IGNORE).all() and (labels[raw > 0] == raw[raw > 0] - 1).all()


def test_missing_and_malformed_roots_name_layout_and_prepare(tmp_path):
    with pytest.raises(DatasetError, match=r"ADEChallengeData2016/\{images/validation.*prepare ade20k-150"):
        open_dataset("ade20k-150", tmp_path / "nope")
    (tmp_path / "images/validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match="python -m evaluation prepare ade20k-150"):
        open_dataset("ade20k-150", tmp_path)
    (tmp_path / "annotations/validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no image/label pairs"):
        open_dataset("ade20k-150", tmp_path)
    with pytest.raises(DatasetError, match="prepare pc-459"):
        open_dataset("pc-459", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_dataset("coco", tmp_path)


def test_malformed_label_names_the_file(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _jpg(root / "images/validation/a.jpg", 2, 2)
    _label(root / "annotations/validation/a.png", np.array([[0, 151], [1, 1]], np.uint8))  # 151: no such class
    ds = open_dataset("ade20k-150", root)
    with pytest.raises(ValueError, match=r"a\.png.*151"):
        ds.load_label(ds.samples[0])
    _label(root / "annotations/validation/a.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="one channel"):
        ds.load_label(ds.samples[0])


def test_real_ade_sample(shared_data):
    ds = open_dataset("ade20k-150", shared_data / "ade20k_sceneparsing_val")
    assert [s.key for s in ds.samples] == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    sizes = {"ADE_val_00000001": (512, 683), "ADE_val_00000002": (364, 500), "ADE_val_00000003": (300, 400)}
    for s in ds.samples:
        labels = ds.load_label(s)
        raw = np.asarray(Image.open(s.label))
        assert labels.shape == sizes[s.key] == Image.open(s.image).size[::-1]
        assert labels.max() <= 102 and (labels[raw == 0] == IGNORE).all() and (labels[raw > 0] == raw[raw > 0] - 1).all()
    names = [line.split("\t")[-1].strip() for line in
             (shared_data / "ade20k_sceneparsing_val/objectInfo150.txt").read_text().splitlines()[1:]]
    # the class order is objectInfo150's: each CAT-Seg name is one of the row's names
    assert all(ours in [p.strip() for p in theirs.split(",")] for ours, theirs in zip(ds.classes.names, names, strict=True))
