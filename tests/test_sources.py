"""Sources: COCO masks equal pycocotools annToMask, VG boxes, folders, image probing, bad files."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from job_helpers import write_coco
from PIL import Image

from pipeline.record import Record
from pipeline.sources import CocoSource, FolderSource, ReadError, SourceError, VgSource, probe
from shards import make_key
from shards import rle as rle_utils


def _rows(source) -> dict[str, tuple[bytes, Record]]:
    return {r["key"]: (r["image"], Record.from_json(r["record"])) for r in source.rows(min_side=1)}


def test_coco_masks_equal_ann_to_mask_for_polygons_rle_and_crowd(tmp_path):
    from pycocotools.coco import COCO

    paths = write_coco(tmp_path, {"a.png": (40, 30), "b.png": (33, 21)})
    inst = json.loads(paths["annotations"].read_text())
    m = np.zeros((30, 40), dtype=np.uint8, order="F")
    m[5:20, 10:30] = 1
    compressed = rle_utils.encode_one(m.astype(bool))
    uncompressed = {"size": [30, 40], "counts": [5 * 30 + 5, 15] + [15, 15] * 19 + [15, 30 * 40]}
    uncompressed["counts"][-1] = 30 * 40 - sum(uncompressed["counts"][:-1])
    inst["annotations"] += [
        {"id": 10, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": compressed},
        {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": uncompressed},
    ]
    inst["categories"].append({"id": 2, "name": "blob"})
    paths["annotations"].write_text(json.dumps(inst))
    rows = _rows(CocoSource("coco", str(paths["images"]), str(paths["annotations"]), str(paths["captions"])))
    coco = COCO(str(paths["annotations"]))
    _, rec = rows[make_key("coco", 1)]
    assert rec.failure is None and (rec.width, rec.height) == (40, 30)
    assert rec.captions == [{"text": "A thing on a table.", "source": "coco"}]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=1))
    assert len(rec.segments) == len(anns) == 3
    for seg, ann in zip(rec.segments, anns, strict=True):
        assert np.array_equal(rle_utils.decode(seg["rle"]), coco.annToMask(ann).astype(bool))
        assert seg["texts"][0] == {"text": coco.cats[ann["category_id"]]["name"], "source": "coco", "score": 1.0}
        assert seg["area"] == int(coco.annToMask(ann).sum())


def test_unknown_image_and_missing_file_are_failures(tmp_path):
    paths = write_coco(tmp_path, {"a.png": (20, 20), "gone.png": (20, 20)},
                       extra_anns=[{"id": 99, "image_id": 777, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}])
    (paths["images"] / "gone.png").unlink()
    rows = _rows(CocoSource("coco", str(paths["images"]), str(paths["annotations"])))
    unknown = rows[make_key("coco", 777)][1].failure
    assert unknown.stage == "source" and "not in the images list" in unknown.error
    missing = rows[make_key("coco", 2)][1].failure
    assert missing.stage == "read" and "not found" in missing.error
    assert rows[make_key("coco", 1)][1].failure is None


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {k: v for k, v in d.items() if k != "images"}, "images"),
    (lambda d: {**d, "images": [{**d["images"][0], "width": "wide"}]}, "images[0].width"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "segmentation": "x"}]}, "segmentation"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": 5}]}, "category_id 5"),
    (lambda d: {**d, "images": d["images"] * 2}, "listed twice"),
])
def test_malformed_coco_file_is_a_clear_error_at_plan(tmp_path, mutate, expect):
    paths = write_coco(tmp_path, {"a.png": (20, 20)}, captions=False)
    data = mutate(json.loads(paths["annotations"].read_text()))
    paths["annotations"].write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(SourceError) as e:
        list(CocoSource("coco", str(paths["images"]), str(paths["annotations"])).plan())
    assert str(paths["annotations"]) in str(e.value) and expect in str(e.value)


def test_vg_regions_become_clipped_boxes(tmp_path):
    (tmp_path / "images" / "VG_100K").mkdir(parents=True)
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "VG_100K" / "1.jpg")
    (tmp_path / "image_data.json").write_text(json.dumps(
        [{"image_id": 1, "width": 50, "height": 40, "url": "https://x/VG_100K/1.jpg"}]))
    (tmp_path / "regions.json").write_text(json.dumps([
        {"id": 1, "regions": [{"region_id": 1, "image_id": 1, "phrase": " a  red ball ", "x": 40, "y": 5,
                               "width": 30, "height": 10},
                              {"region_id": 2, "image_id": 1, "phrase": "", "x": 0, "y": 0, "width": 5, "height": 5}]},
        {"id": 2, "regions": [{"region_id": 3, "image_id": 2, "phrase": "x", "x": 0, "y": 0, "width": 5, "height": 5}]},
    ]))
    rows = _rows(VgSource("vg", str(tmp_path / "images"), str(tmp_path / "image_data.json"),
                          regions=str(tmp_path / "regions.json")))
    _, rec = rows[make_key("vg", 1)]
    assert rec.failure is None and rec.file_name == "VG_100K/1.jpg"
    assert [(b.xyxy, b.text, b.source) for b in rec.boxes] == [([40.0, 5.0, 50.0, 15.0], "a red ball", "vg")]
    assert rows[make_key("vg", 2)][1].failure.stage == "source"
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "regions": [{"phrase": "x"}]}]))
    with pytest.raises(SourceError, match=r"bad\.json.*regions\[0\]\.x"):
        list(VgSource("vg", str(tmp_path / "images"), str(tmp_path / "image_data.json"),
                      regions=str(tmp_path / "bad.json")).plan())


def test_folder_source_walks_the_tree_with_stable_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    Image.new("RGB", (30, 20)).save(tmp_path / "sub" / "b.PNG")
    (tmp_path / "notes.txt").write_text("x")
    rows = _rows(FolderSource("folder", str(tmp_path)))
    recs = {r.image_id: r for _, r in rows.values()}
    assert set(recs) == {"a.jpg", "sub/b.PNG"}
    assert (recs["sub/b.PNG"].width, recs["sub/b.PNG"].image_ext) == (30, "png")
    assert set(rows) == {make_key("folder", "a.jpg"), make_key("folder", "sub/b.PNG")}


def _jpeg(size=(40, 30), mode="RGB", **kw) -> bytes:
    b = io.BytesIO()
    Image.new(mode, size, 128 if mode != "RGB" else (10, 200, 30)).save(b, "JPEG", **kw)
    return b.getvalue()


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG header claiming w x h pixels (PIL refuses it at open, before reading any pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_probe_handles_or_refuses_every_kind_of_bad_image():
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = probe(_jpeg((40, 30), exif=exif), min_side=8, max_pixels=10**8)
    assert (rotated.width, rotated.height, rotated.orientation) == (30, 40, 6)
    assert probe(_jpeg(mode="CMYK"), min_side=8, max_pixels=10**8).ext == "jpg"
    assert probe(_png(Image.new("I;16", (20, 10), 4000)), min_side=8, max_pixels=10**8).width == 20
    assert probe(_png(Image.new("P", (20, 10))), min_side=8, max_pixels=10**8).ext == "png"
    big = _jpeg((200, 150), quality=95)
    cases = {b"": "0 bytes", _jpeg()[:300]: "(?i)truncated", big[: len(big) * 2 // 3]: "(?i)truncated",
             b"<html>no</html>": "not an image",
             _png(Image.new("RGB", (1, 1))): "smaller than", bomb_png(): "decompression-bomb"}
    for data, reason in cases.items():
        with pytest.raises(ReadError, match=reason):
            probe(data, min_side=8, max_pixels=10**8)
    with pytest.raises(ReadError, match="read.max_pixels=100"):
        probe(_jpeg(), min_side=8, max_pixels=100)
    gif = io.BytesIO()
    Image.new("P", (20, 20)).save(gif, "GIF")
    with pytest.raises(ReadError, match="unsupported image format GIF"):
        probe(gif.getvalue(), min_side=8, max_pixels=10**8)


def test_annotation_size_disagreeing_with_the_image_is_a_read_failure(tmp_path: Path):
    paths = write_coco(tmp_path, {"a.png": (20, 20)})
    inst = json.loads(paths["annotations"].read_text())
    inst["images"][0]["width"] = 25
    paths["annotations"].write_text(json.dumps(inst))
    (_, rec), = _rows(CocoSource("coco", str(paths["images"]), str(paths["annotations"]))).values()
    assert rec.failure.stage == "read" and "annotation file says 25x20" in rec.failure.error
