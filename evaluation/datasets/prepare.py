"""``python -m evaluation prepare DATASET --src ...``: the benchmark layouts from the official downloads.

Each function does what CAT-Seg's ``datasets/prepare_*.py`` does (github.com/cvlab-kaist/CAT-Seg;
SED ships the same scripts), so the labels are the ones the published figures were measured on,
with three differences that change no label: nothing is unpickled (ADE20K-847 finds its validation
images by walking ``images/ADE/validation`` instead of reading ``index_ade20k.pkl``), the label
mappings are lookup tables instead of per-value loops, and a file that cannot be converted is
reported and skipped instead of stopping the run. Outputs are written next to the source by
default (``--dst`` = ``--src``), which is where the loaders look.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..classes import DATA_DIR
from .base import DatasetError

log = logging.getLogger(__name__)

#: CAT-Seg prepare_pascal_context_59.py ``_mapping``: the 59 PASCAL-Context ids (plus 0, background),
#: sorted; the k-th id becomes label k - 1 (0 -> 255).
PC59_IDS = np.sort(np.array([
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295, 296,
    427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347, 220, 349,
    360, 98, 187, 104, 105, 366, 189, 368, 113, 115]))
ADE847_MAX_SIDE = 512   # CAT-Seg prepare_ade20k_full.py: short side to 512 when both sides exceed it


def _need_dir(path: Path, what: str, dataset: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"prepare {dataset}: {path} is not a directory ({what})")
    return path


def _progress(items: Iterable, total: int, desc: str) -> Iterable:
    return tqdm(items, total=total, desc=desc, unit="img", mininterval=1.0)


def prepare_ade150(src: Path, dst: Path) -> int:
    """``annotations/validation`` (uint8, 0 = other) -> ``annotations_detectron2/validation`` (id - 1; 0 -> 255)."""
    ann = _need_dir(src / "annotations" / "validation", "ADEChallengeData2016.zip unpacked", "ade20k-150")
    out = dst / "annotations_detectron2" / "validation"
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(ann.glob("*.png"))
    done = 0
    for f in _progress(files, len(files), "ade20k-150"):
        img = np.asarray(Image.open(f))
        if img.dtype != np.uint8 or img.ndim != 2:
            log.error("%s: expected a uint8 single-channel label, got %s %s; skipped", f, img.dtype, img.shape)
            continue
        Image.fromarray(img - np.uint8(1)).save(out / f.name)  # uint8 wrap: 0 (other) -> 255
        done += 1
    return done


def ade_full_class_codes(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K full ``*_seg.png`` -> class codes ``int32(R / 10) * 256 + G`` (CAT-Seg's ``loadAde20K``)."""
    r, g = seg_rgb[..., 0], seg_rgb[..., 1]
    return (r / 10).astype(np.int32) * 256 + g.astype(np.int32)


def ade847_resize_shape(h: int, w: int) -> tuple[int, int] | None:
    """The (h, w) CAT-Seg resizes to, or None: the short side becomes 512 when both sides exceed 512."""
    if w >= h > ADE847_MAX_SIDE:
        return ADE847_MAX_SIDE, round(w / float(h) * ADE847_MAX_SIDE)
    if h >= w > ADE847_MAX_SIDE:
        return round(h / float(w) * ADE847_MAX_SIDE), ADE847_MAX_SIDE
    return None


def prepare_ade847(src: Path, dst: Path) -> int:
    """``images/ADE/validation/**/ADE_val_*.jpg`` + ``*_seg.png`` -> ``images_detectron2/validation/*.jpg``
    and ``annotations_detectron2/validation/*.tif`` (uint16 train ids 0..846, 65535 elsewhere)."""
    val = _need_dir(src / "images" / "ADE" / "validation", "ADE20K_2021_17_01 unpacked", "ade20k-847")
    table = json.loads((DATA_DIR / "ade847.json").read_text())["ade_full_ids"]
    lut = np.full(max(table) + 1, 65535, dtype=np.uint16)
    lut[np.array(table)] = np.arange(len(table), dtype=np.uint16)
    img_out = dst / "images_detectron2" / "validation"
    lab_out = dst / "annotations_detectron2" / "validation"
    img_out.mkdir(parents=True, exist_ok=True)
    lab_out.mkdir(parents=True, exist_ok=True)
    files = sorted(val.rglob("ADE_val_*.jpg"))
    done = 0
    for f in _progress(files, len(files), "ade20k-847"):
        seg = f.with_name(f.stem + "_seg.png")
        try:
            img = np.asarray(Image.open(f).convert("RGB"))
            codes = ade_full_class_codes(np.asarray(Image.open(seg).convert("RGB")))
        except OSError as e:
            log.error("%s: %s; skipped", f, e)
            continue
        shape = ade847_resize_shape(*img.shape[:2])
        if shape is not None:
            img = cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
            codes = cv2.resize(codes, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        labels = np.full(codes.shape, 65535, dtype=np.uint16)
        known = codes < len(lut)
        labels[known] = lut[codes[known]]
        Image.fromarray(img).save(img_out / f.name)
        Image.fromarray(labels).save(lab_out / f"{f.stem}.tif")
        done += 1
    return done


def pc59_labels(category_map: np.ndarray) -> np.ndarray:
    """PASCAL-Context category ids -> uint8 labels 0..58 (255: background and the other 400 classes)."""
    lut = np.full(max(int(category_map.max()), int(PC59_IDS.max())) + 1, 255, dtype=np.uint8)
    lut[PC59_IDS] = (np.arange(len(PC59_IDS)) - 1).astype(np.uint8)  # id 0 -> -1 -> 255
    return lut[category_map]


def prepare_pc59(src: Path, dst: Path) -> int:
    """``trainval_merged.json`` (Detail API: ``annos_segmentation`` RLEs, val ``phase``) ->
    ``annotations_detectron2/pc59_val/*.png``. Later annotations of an image paint over earlier ones,
    as in CAT-Seg's script; images without any segmentation annotation are skipped (5104 remain)."""
    path = src / "trainval_merged.json"
    if not path.is_file():
        raise DatasetError(f"prepare pc-59: {path} not found (PASCAL-Context trainval_merged.json in the VOC2010 folder)")
    data = json.loads(path.read_text())
    val = {d["image_id"]: d for d in data["images"] if d.get("phase") == "val"}
    annos: dict[int, list[dict]] = {}
    for ann in data["annos_segmentation"]:
        if ann["image_id"] in val:
            annos.setdefault(ann["image_id"], []).append(ann)
    out = dst / "annotations_detectron2" / "pc59_val"
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for image_id, info in _progress(val.items(), len(val), "pc-59"):
        if image_id not in annos:
            log.warning("pc-59: val image %s has no segmentation annotation; skipped", info["file_name"])
            continue
        h, w = int(info["height"]), int(info["width"])
        cat = np.zeros((h, w), dtype=np.int64)
        for a in annos[image_id]:
            seg = a["segmentation"]
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
            cat[mask_utils.decode(rle).astype(bool)] = int(a["category_id"])
        Image.fromarray(pc59_labels(cat)).save(out / (Path(info["file_name"]).stem + ".png"))
        done += 1
    return done


def prepare_pc459(src: Path, dst: Path, val_list: Path | None = None) -> int:
    """``trainval/<id>.mat`` ``LabelMap`` (1..459) -> ``annotations_detectron2/pc459_val/<id>.tif`` (uint16,
    ``LabelMap - 1``) for the ids of ``pascalcontext_val.txt`` (CAT-Seg's list, shipped in evaluation/data)."""
    mats = _need_dir(src / "trainval", "PASCAL-Context trainval.tar.gz unpacked: trainval/*.mat", "pc-459")
    ids_file = val_list or (src / "pascalcontext_val.txt" if (src / "pascalcontext_val.txt").is_file()
                            else DATA_DIR / "pascalcontext_val.txt")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    out = dst / "annotations_detectron2" / "pc459_val"
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for image_id in _progress(ids, len(ids), "pc-459"):
        mat = mats / f"{image_id}.mat"
        if not mat.is_file():
            continue  # as CAT-Seg: ids without a .mat are skipped
        label_map = np.asarray(scipy.io.loadmat(str(mat))["LabelMap"]).astype(np.int64) - 1
        if label_map.min() < 0 or label_map.max() > 458:
            log.error("%s: LabelMap outside 1..459; skipped", mat)
            continue
        Image.fromarray(label_map.astype(np.uint16)).save(out / f"{image_id}.tif", "TIFF")
        done += 1
    return done


def voc20_labels(voc: np.ndarray) -> np.ndarray:
    """VOC ids (0 background, 1..20, 255 border) -> uint8 0..19 with 255 for background, border and anything else."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[1:21] = np.arange(20, dtype=np.uint8)
    return lut[voc]


def prepare_voc20(src: Path, dst: Path, labels: str = "SegmentationClassAug") -> int:
    """``SegmentationClassAug`` of ``ImageSets/Segmentation/val.txt`` -> ``annotations_detectron2/val/*.png``
    (labels with no class pixel at all are not written, as in CAT-Seg's prepare_voc.py)."""
    lab_dir = _need_dir(src / labels, f"VOC2012 {labels}", "voc-20")
    ids_file = src / "ImageSets" / "Segmentation" / "val.txt"
    if not ids_file.is_file():
        raise DatasetError(f"prepare voc-20: {ids_file} not found")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    out = dst / "annotations_detectron2" / "val"
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for image_id in _progress(ids, len(ids), "voc-20"):
        path = lab_dir / f"{image_id}.png"
        if not path.is_file():
            log.error("voc-20: %s missing; skipped", path)
            continue
        mapped = voc20_labels(np.asarray(Image.open(path)))
        if (mapped == 255).all():
            continue
        Image.fromarray(mapped).save(out / f"{image_id}.png", "PNG")
        done += 1
    return done


PREPARERS = {"ade20k-150": prepare_ade150, "ade20k-847": prepare_ade847, "pc-59": prepare_pc59,
             "pc-459": prepare_pc459, "voc-20": prepare_voc20}


def prepare(dataset: str, src: str | Path, dst: str | Path | None = None) -> int:
    """Run the preparer of ``dataset``; returns the number of label files written."""
    if dataset not in PREPARERS:
        raise DatasetError(f"no prepare step for {dataset!r}; choose one of {', '.join(PREPARERS)}")
    src_path = Path(src).expanduser()
    if not src_path.is_dir():
        raise DatasetError(f"prepare {dataset}: --src {src_path} is not a directory")
    return PREPARERS[dataset](src_path, Path(dst).expanduser() if dst else src_path)
