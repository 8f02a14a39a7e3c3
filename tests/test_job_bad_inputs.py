"""Every kind of bad input ends as a failure record with its stage and a clear reason (or is
handled correctly), and the rest of the job completes; a malformed annotation file stops the job
at start with a message naming the file."""

from __future__ import annotations

import io
import json
import os

import pytest
from job_helpers import write_coco
from PIL import Image
from test_sources import bomb_png

import shards
from pipeline import cli
from pipeline.config import load_config
from pipeline.job import run_job
from shards import make_key


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _bad_dataset(root):
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60x40, shown 40x60
    big = _save(Image.effect_noise((120, 90), 60).convert("RGB"), "JPEG", quality=95)
    files = {
        "zero.jpg": b"",
        "truncated.jpg": big[: len(big) // 2],
        "notimage.jpg": b"%PDF-1.4 not an image at all",
        "cmyk.jpg": _save(Image.new("CMYK", (48, 32), (0, 128, 255, 0)), "JPEG"),
        "gray16.png": _save(Image.new("I;16", (48, 32), 40000), "PNG"),
        "palette.png": _save(Image.new("RGB", (48, 32), (200, 10, 10)).convert("P"), "PNG"),
        "exif.jpg": _save(Image.new("RGB", (60, 40), (0, 0, 200)), "JPEG", exif=exif),
        "onepixel.png": _save(Image.new("RGB", (1, 1)), "PNG"),
        "bomb.png": bomb_png(),
        "noann.png": _save(Image.new("RGB", (48, 32)), "PNG"),
    }
    for name, data in files.items():
        (img_dir / name).write_bytes(data)
    (img_dir / "unreadable.jpg").mkdir()  # exists but cannot be read as a file (EISDIR), even as root
    files["unreadable.jpg"] = b""
    os.mkfifo(img_dir / "fifo.png")  # a read would block for ever
    (root / "outside.png").write_bytes(files["palette.png"])
    (img_dir / "escape.png").symlink_to(root / "outside.png")  # leaves --images
    files.update({"fifo.png": b"", "escape.png": b"", "far.png": files["palette.png"]})
    (img_dir / "far.png").write_bytes(files["palette.png"])
    order = {"good1.png": (48, 32), "good2.png": (48, 32), "good3.png": (48, 32), **dict.fromkeys(files),
             "missing.jpg": (48, 32)}
    declared = {"zero.jpg": (120, 90), "truncated.jpg": (120, 90), "notimage.jpg": (48, 32),
                "exif.jpg": (40, 60), "bomb.png": (100_000, 100_000), "unreadable.jpg": (48, 32),
                "fifo.png": (48, 32), "escape.png": (48, 32)}
    paths = write_coco(root, order, declared=declared,
                       extra_anns=[{"id": 500, "image_id": 4242, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}])
    (img_dir / "missing.jpg").unlink()
    inst = json.loads(paths["annotations"].read_text())
    ids = {im["file_name"]: im["id"] for im in inst["images"]}
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != ids["noann.png"]]
    for a in inst["annotations"]:
        if a["image_id"] == ids["far.png"]:  # pycocotools would allocate without bound on this polygon
            a["segmentation"] = [[0, 0, 1e12, 0, 1e12, 1e12]]
    inst["images"].append({"id": 999, "file_name": "../outside.png", "width": 48, "height": 32})
    ids["../outside.png"] = 999
    paths["annotations"].write_text(json.dumps(inst))
    return paths, ids


EXPECTED = {  # file -> (stage, words of the reason); None = handled and written
    "zero.jpg": ("read", "0 bytes"), "truncated.jpg": ("read", "truncated"),
    "notimage.jpg": ("read", "not an image"), "onepixel.png": ("read", "1x1 is smaller than"),
    "bomb.png": ("read", "decompression-bomb"), "missing.jpg": ("read", "not found"),
    "unreadable.jpg": ("read", "not a regular file"), "fifo.png": ("read", "not a regular file"),
    "escape.png": ("read", "outside --images"), "far.png": ("source", "outside the 48x32 image"),
    "../outside.png": ("source", "leaves --images"),
    "noann.png": ("nms", "fewer than shards.min_segments"), "good3.png": ("captioner", "probe refuses"),
    "exif.jpg": ("read", "EXIF orientation 6"),  # annotations in the stored frame: read.exif=trust to keep it
    "cmyk.jpg": None, "gray16.png": None, "palette.png": None, "good1.png": None,
    "good2.png": None,
}


@pytest.mark.slow
def test_bad_inputs_become_failures_and_the_job_completes(tmp_path, ray_local):
    paths, ids = _bad_dataset(tmp_path / "data")
    out = tmp_path / "out"
    cfg = load_config("pipeline/configs/demo.yaml", [
        "source.name=bad", f"source.images={paths['images']}", f"source.annotations={paths['annotations']}",
        f"source.captions={paths['captions']}", "captioner.enabled=true", "impl.captioner=job_probes:FlakyProbe",
        "captioner.batch_size=4", "shards.max_samples=4"])
    summary = run_job(cfg, out, progress=False)
    failures = {f["key"]: f for f in shards.read_failures(out).to_pylist()}
    written = {s.key: s for s in shards.iter_samples(out)}
    for name, expected in EXPECTED.items():
        key = make_key("bad", ids[name])
        if expected is None:
            assert key in written and key not in failures, (name, failures.get(key))
        else:
            assert key not in written and failures[key]["stage"] == expected[0], (name, failures.get(key))
            assert expected[1] in failures[key]["error"], (name, failures[key]["error"])
            assert name in failures[key]["error"] or expected[0] != "read", failures[key]["error"]
    unknown = failures[make_key("bad", 4242)]
    assert unknown["stage"] == "source" and "not in the images list" in unknown["error"]
    assert (summary["written"], summary["failed"]) == (5, 15)
    assert summary["failed_by_stage"] == {"read": 10, "source": 3, "nms": 1, "captioner": 1}
    for f in failures.values():  # no absolute path leaks into the failure table
        assert str(tmp_path) not in f["error"], f


@pytest.mark.parametrize("content, expect", [
    ("{broken", "not valid JSON"),
    (json.dumps({"images": [], "categories": []}), "annotations"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": "wide", "height": 3}], "annotations": [],
                 "categories": []}), "images[0].width"),
])
def test_malformed_annotation_file_stops_the_job_at_start(tmp_path, capsys, content, expect):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "instances.json"
    ann.write_text(content)
    out = tmp_path / "out"
    rc = cli.main(["curate", "--config", "pipeline/configs/coco-annotations.yaml", "--images",
                   str(tmp_path / "images"), "--annotations", str(ann), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(ann) in err and expect in err
    assert not out.exists() or not list(out.glob("*.tar"))


def test_bad_config_override_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["curate", "--config", "pipeline/configs/demo.yaml", "--output", str(tmp_path),
                   "grounder.box_thresh=0.3"])
    assert rc == 2 and "grounder.box_thresh" in capsys.readouterr().err


def test_missing_weights_stop_a_local_job_at_start_naming_the_download_command(tmp_path, capsys):
    paths = write_coco(tmp_path / "data", {"a.png": (24, 20)})
    rc = cli.main(["curate", "--config", "pipeline/configs/coco.yaml", "--images", str(paths["images"]),
                   "--annotations", str(paths["annotations"]), "--output", str(tmp_path / "out"),
                   f"captioner.model={tmp_path / 'no-llava'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no-llava" in err and "python -m pipeline models download" in err
    assert not (tmp_path / "out").exists()
