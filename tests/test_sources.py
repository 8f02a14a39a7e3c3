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
from shards.schema import Caption, Text


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
    rows = _rows(CocoSource("coco", str(paths["images"]), str(paths["annotations"]), str(paths["captions"]),
                            keep_crowd=True))
    coco = COCO(str(paths["annotations"]))
    _, rec = rows[make_key("coco", 1)]
    assert rec.failure is None and (rec.width, rec.height) == (40, 30)
    assert rec.captions == [Caption("A thing on a table.", "coco")]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=1))
    assert len(rec.segments) == len(anns) == 3
    for seg, ann in zip(rec.segments, anns, strict=True):
        assert np.array_equal(rle_utils.decode(seg.rle), coco.annToMask(ann).astype(bool))
        assert seg.texts[0] == Text(coco.cats[ann["category_id"]]["name"], "coco", 1.0)
        assert seg.area == int(coco.annToMask(ann).sum())


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
    (tmp_path / "bad.json").write_text(json.dumps({"regions": []}))
    with pytest.raises(SourceError, match="expected a JSON list"):
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
    with pytest.raises(ReadError, match="JPEG, PNG or WebP expected"):  # other parsers are never reached
        probe(gif.getvalue(), min_side=8, max_pixels=10**8)


def test_annotation_size_disagreeing_with_the_image_is_a_read_failure(tmp_path: Path):
    paths = write_coco(tmp_path, {"a.png": (20, 20)})
    inst = json.loads(paths["annotations"].read_text())
    inst["images"][0]["width"] = 25
    paths["annotations"].write_text(json.dumps(inst))
    (_, rec), = _rows(CocoSource("coco", str(paths["images"]), str(paths["annotations"]))).values()
    assert rec.failure.stage == "read" and "annotation file says 25x20" in rec.failure.error


# -- hostile inputs (issue 9): every one becomes that image's failure, or a clear error at start --------
def _coco_with(tmp_path, objects: dict[str, object], **kw):
    """A COCO dataset with one image per entry of ``objects`` (file name -> its segmentation)."""
    paths = write_coco(tmp_path, dict.fromkeys(objects, (40, 30)), captions=False)
    inst = json.loads(paths["annotations"].read_text())
    for a, seg in zip(inst["annotations"], objects.values(), strict=True):
        if seg is not None:
            a["segmentation"] = seg
    paths["annotations"].write_text(json.dumps(inst).replace("123456789.125", "1e999"))  # valid JSON, inf as float
    return paths


def test_hostile_segmentations_fail_their_image_before_pycocotools(tmp_path):
    far = [[0, 0, 1e9, 0, 1e9, 1e9]]
    zigzag = [[v for i in range(20_000) for v in ((0, 0) if i % 2 else (39, 29))]]
    objects = {"ok.png": None, "inf.png": [[0, 0, 123456789.125, 5, 5, 5]], "far.png": far, "zigzag.png": zigzag,
               "odd.png": [[0, 0, 5, 0, 5]], "rle.png": {"size": [30, 40], "counts": "0;"},
               "rlesize.png": {"size": [3000, 4000], "counts": [12_000_000]}}
    paths = _coco_with(tmp_path, objects)
    rows = {Record.from_json(r["record"]).file_name: Record.from_json(r["record"])
            for r in CocoSource("coco", str(paths["images"]), str(paths["annotations"])).rows(min_side=1)}
    assert rows["ok.png"].failure is None and len(rows["ok.png"].segments) == 1
    reasons = {"inf.png": "non-finite", "far.png": "outside the 40x30 image", "zigzag.png": "outline",
               "odd.png": "odd number", "rle.png": "bad compressed RLE", "rlesize.png": "differs from the image"}
    for name, words in reasons.items():
        f = rows[name].failure
        assert f is not None and f.stage == "source" and words in f.error, (name, f)
        assert "annotations[" in f.error, f  # the offending annotation's index in the file


def test_hostile_file_names_never_leave_the_image_root(tmp_path):
    paths = write_coco(tmp_path / "d", {"a.png": (20, 20), "b.png": (20, 20), "c.png": (20, 20),
                                        "d.png": (20, 20), "e.png": (20, 20)}, captions=False)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20)).save(secret)
    (paths["images"] / "link.png").symlink_to(secret)
    inst = json.loads(paths["annotations"].read_text())
    names = ["a.png", "x\0.png", "../secret.png", str(secret), "link.png"]
    for im, name in zip(inst["images"], names, strict=True):
        im["file_name"] = name
    paths["annotations"].write_text(json.dumps(inst))
    src = CocoSource("coco", str(paths["images"]), str(paths["annotations"]))
    rows = {r["key"]: (r["image"], Record.from_json(r["record"])) for r in src.rows(min_side=1)}
    got = {rec.file_name: rec.failure for _, rec in rows.values()}
    assert got["a.png"] is None
    assert got["x\0.png"].stage == "source" and "NUL" in got["x\0.png"].error
    assert got["../secret.png"].stage == "source" and "'..'" in got["../secret.png"].error
    assert got[str(secret)].stage == "source" and "absolute" in got[str(secret)].error
    assert got["link.png"].stage == "read" and "outside --images" in got["link.png"].error
    for f in got.values():  # no absolute path and no file size in any message
        assert f is None or (str(tmp_path) not in f.error and "bytes" not in f.error)
    followed = {Record.from_json(r["record"]).file_name: Record.from_json(r["record"]).failure
                for r in src.rows(min_side=1, follow_symlinks_outside=True)}
    assert followed["link.png"] is None


@pytest.mark.timeout(60)
def test_fifos_devices_big_files_and_read_exceptions_are_failures_not_hangs(tmp_path, monkeypatch):
    import os

    from pipeline.sources import base

    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "fifo.png")  # opening it for reading would block without O_NONBLOCK
    (images / "zero.png").symlink_to("/dev/zero")  # would read without end
    Image.effect_noise((64, 64), 50).convert("RGB").save(images / "big.png")
    Image.new("RGB", (21, 21), (1, 2, 3)).save(images / "boom.png")
    Image.new("RGB", (20, 20)).save(images / "ok.png")
    src = FolderSource("folder", str(images))
    assert {it["path"] for it in src.plan()} >= {"ok.png", "big.png"}
    items = [base.item(make_key("folder", n), n, Record(source="folder", image_id=n, file_name=n), root=images)
             for n in ("fifo.png", "zero.png", "big.png", "boom.png", "ok.png")]
    real_probe = base.probe
    boom = (images / "boom.png").read_bytes()
    monkeypatch.setattr(base, "probe", lambda data, **kw: (_ for _ in ()).throw(MemoryError())
                        if data == boom else real_probe(data, **kw))
    got = {}
    for it in items:
        rec = Record.from_json(base.read_item(it, min_side=1, max_pixels=10**8, verify="draft", max_bytes=4000,
                                              follow_symlinks_outside=True)["record"])
        got[rec.file_name] = rec.failure
    assert got["ok.png"] is None
    assert "not a regular file" in got["fifo.png"].error and "not a regular file" in got["zero.png"].error
    assert "read.max_bytes=4000" in got["big.png"].error
    assert got["boom.png"].stage == "read" and "MemoryError" in got["boom.png"].error
    gone = base.item("folder_gone", "gone.png", Record(source="folder", image_id="gone.png"), root=images)
    missing = Record.from_json(base.read_item(gone, min_side=1, max_pixels=10**8, verify="draft")["record"]).failure
    assert missing.retry and "not found" in missing.error  # the environment's fault: a rerun retries it


@pytest.mark.parametrize("content, words", [
    ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than"),
    ('{"images": [], "annotations": [{"segmentation": [[NaN, 1, 2]]}], "categories": []}', "not valid JSON"),
])
def test_hostile_json_is_one_clear_error(tmp_path, content, words):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "instances.json"
    ann.write_text(content)
    with pytest.raises(SourceError, match=words):
        list(CocoSource("coco", str(tmp_path / "images"), str(ann)).plan())


def test_missing_image_root_is_an_error_before_planning(tmp_path):
    paths = write_coco(tmp_path, {"a.png": (20, 20)})
    with pytest.raises(SourceError, match="is not a directory"):
        CocoSource("coco", str(tmp_path / "nope"), str(paths["annotations"]))
    with pytest.raises(SourceError, match="is not a directory"):
        VgSource("vg", str(tmp_path / "nope"), str(paths["annotations"]), regions=str(paths["annotations"]))


PLAN_MEMORY = r'''
import json, sys, time
sys.path.insert(0, sys.argv[3])
from pipeline.sources import CocoSource

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
t = time.time()
items = list(CocoSource("coco", sys.argv[1], sys.argv[2]).plan())
print(json.dumps({"rss_mb": (status("VmHWM") - before) / 1024, "s": time.time() - t, "n": len(items)}))
'''


@pytest.mark.slow
def test_planning_a_large_annotation_file_takes_bounded_memory(tmp_path):
    """~26 MB of polygons for 10 images: ``json.load`` + pydantic raised the peak by ~8x the file;
    streaming keeps about one compact copy of the per-image JSON (~2x)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.png", "width": 640, "height": 480} for i in range(1, 11)]
    poly = ",".join(f"{v:.2f}" for v in rng.uniform(0, 480, 400))
    (tmp_path / "images").mkdir()
    ann = tmp_path / "instances.json"
    with open(ann, "w") as f:
        f.write('{"images": ' + json.dumps(images) + ', "categories": [{"id": 1, "name": "x"}], "annotations": [')
        f.write(",".join(f'{{"id": {i}, "image_id": {i % 10 + 1}, "category_id": 1, "segmentation": [[{poly}]]}}'
                         for i in range(10_000)))
        f.write("]}")
    size_mb = ann.stat().st_size / 2**20
    out = subprocess.run([sys.executable, "-c", PLAN_MEMORY, str(tmp_path / "images"), str(ann),
                          str(Path(__file__).resolve().parents[1])], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == 10
    assert got["rss_mb"] < 1.5 * size_mb + 64, (got, size_mb)


def test_coco_crowd_regions_are_skipped_unless_kept(shared_data):
    """The shared COCO val subset has two iscrowd annotations (images 34417 and 553664)."""
    from pycocotools.coco import COCO

    from pipeline.config import SourceConfig
    from pipeline.sources import make_source

    root = shared_data / "coco2017_val_subset"
    ann = root / "annotations" / "instances_val2017.json"
    coco = COCO(str(ann))
    counts = {}
    for keep in (False, True):
        source = make_source(SourceConfig(kind="coco", images=str(root / "val2017"), annotations=str(ann),
                                          keep_crowd=keep))
        counts[keep] = {it["key"]: len(json.loads(it["ann"])["objects"]) for it in source.plan()}
    for image_id in (34417, 553664):
        key = make_key("coco", image_id)
        all_anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        crowd = sum(a["iscrowd"] for a in all_anns)
        assert crowd == 1 and counts[True][key] == len(all_anns) and counts[False][key] == len(all_anns) - crowd
    assert sum(counts[True].values()) - sum(counts[False].values()) == 2


@pytest.mark.parametrize("orientation", [3, 2, 6])
def test_annotated_image_with_exif_orientation_fails_unless_trusted(tmp_path, orientation):
    """A square image rotated by EXIF keeps its size, so only the orientation tells that COCO's masks
    (drawn on the stored pixels) would land on the wrong pixels: it fails with the reason, unless
    ``read.exif=trust`` says the annotations are in the oriented frame. Orientation 1 always passes."""
    paths = write_coco(tmp_path, {"rot.jpg": None, "plain.jpg": (48, 48)}, declared={"rot.jpg": (48, 48)})
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(paths["images"] / "rot.jpg", exif=exif)
    src = CocoSource("coco", str(paths["images"]), str(paths["annotations"]))
    rejected = {Record.from_json(r["record"]).file_name: Record.from_json(r["record"]) for r in src.rows(min_side=1)}
    assert rejected["plain.jpg"].failure is None
    assert rejected["rot.jpg"].failure is not None and rejected["rot.jpg"].failure.stage == "read"
    assert f"EXIF orientation {orientation}" in rejected["rot.jpg"].failure.error
    assert "read.exif=trust" in rejected["rot.jpg"].failure.error
    trusted = {Record.from_json(r["record"]).file_name: Record.from_json(r["record"])
               for r in src.rows(min_side=1, exif="trust")}
    assert trusted["rot.jpg"].failure is None and len(trusted["rot.jpg"].segments) == 1


def test_folder_images_with_exif_orientation_are_read(tmp_path):
    """No annotations, nothing to misalign: a folder image is shown in its EXIF orientation."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (9, 9, 9)).save(images / "a.jpg", exif=exif)
    rec = Record.from_json(next(FolderSource("folder", str(images)).rows(min_side=1))["record"])
    assert rec.failure is None and (rec.width, rec.height) == (30, 40)


def _nesting(value) -> int:
    """Depth of a Python JSON value: what ``check_depth`` must find in its ``json.dumps`` text."""
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    return 0


def test_check_depth_ignores_brackets_in_strings_across_chunk_boundaries(tmp_path):
    from pipeline.sources.schemas import check_depth

    rng = np.random.default_rng(0)

    def value(level: int):
        kind = rng.integers(0, 4 if level < 6 else 2)
        if kind == 0:  # strings full of what would fool a naive count: brackets, quotes, backslash runs
            return "".join(rng.choice(list('[]{}"\\\\ab'), size=int(rng.integers(0, 12))))
        if kind == 1:
            return float(rng.integers(-5, 5))
        if kind == 2:
            return [value(level + 1) for _ in range(int(rng.integers(0, 4)))]
        return {f"k{i}{'[' * i}": value(level + 1) for i in range(int(rng.integers(0, 4)))}

    path = tmp_path / "doc.json"
    for _ in range(60):
        doc = [value(0) for _ in range(3)]
        text = json.dumps(doc, indent=int(rng.integers(0, 2)) or None)
        path.write_text(text)
        want = _nesting(doc)
        for chunk in (1, 2, 3, 7, 64, 1 << 20):
            assert check_depth(path, limit=1000, chunk=chunk) == want, (text, chunk)
    path.write_text('{"a": "\\\\\\\\", "b": [[["x\\\\"]]]}')  # escaped backslashes before closing quotes
    assert check_depth(path, chunk=3) == 4
