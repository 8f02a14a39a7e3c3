"""`shards inspect` on real captions, crowded images and hostile member names (issues 9 and 10)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shards_util import draw_image, make_sample, sample_members, write_tar

import shards
from shards import cli, overlay, rle
from shards.overlay import layout_labels, render
from shards.reader import ShardSample

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_val_subset"


def _coco_captions(image_id: int) -> list[str]:
    path = COCO / "annotations" / "captions_val2017.json"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    return [a["caption"] for a in json.loads(path.read_text())["annotations"] if a["image_id"] == image_id]


def test_caption_with_a_line_break_renders(tmp_path, capsys):
    """COCO's caption of image 359219 ends in "cut\\n." (it crashed ``inspect``, as in the README's example)."""
    captions = _coco_captions(359219)
    assert any("\n" in c for c in captions)
    meta, image, _ = make_sample(0)
    meta.captions = [shards.Caption(c, "coco") for c in captions]
    meta.segments[0].texts.append(shards.Text("a pie\nwith a fork", "coco"))
    with shards.ShardWriter(tmp_path / "shards") as writer:
        writer.write(meta, image)
    assert cli.main(["inspect", str(tmp_path / "shards"), "--output", str(tmp_path / "png"), "--no-progress"]) == 0
    assert "wrote 1 overlay(s)" in capsys.readouterr().out
    png = Image.open(tmp_path / "png" / f"{meta.key}.png")
    one_line = make_sample(0)[0]
    plain = render(ShardSample(key=one_line.key, meta=one_line, image_bytes=image))
    assert png.height > plain.height  # the captions' lines are in the legend


def _crowded(width: int = 320, height: int = 240) -> tuple[ShardSample, np.ndarray]:
    """A large segment with a dense 5x6 grid of small ones on top: labels placed on the small
    objects would hide them."""
    small = []
    for r in range(5):
        for c in range(6):
            m = np.zeros((height, width), bool)
            x, y = 100 + c * 11, 75 + r * 11
            m[y:y + 6, x:x + 6] = True
            small.append(m)
    big = np.zeros((height, width), bool)
    big[25:200, 50:250] = True
    masks = np.stack([big, *small])
    rles = rle.encode(masks)
    areas, boxes = rle.area(rles), rle.bbox(rles)
    segments = [shards.Segment(id=k, rle=r, bbox=[float(v) for v in boxes[k]], area=int(areas[k]),
                               texts=[shards.Text(f"small thing number {k}", "t")]) for k, r in enumerate(rles)]
    meta = shards.SampleMeta(key="crowd", image_id="1", source="t", width=width, height=height, image_ext="png",
                             segments=segments)
    return ShardSample(key="crowd", meta=meta, image_bytes=draw_image(masks)), masks


def test_crowded_labels_leave_small_masks_visible(monkeypatch):
    sample, masks = _crowded()
    placed = []
    draw_labels = overlay._draw_labels
    monkeypatch.setattr(overlay, "_draw_labels", lambda *a, **k: placed.extend(draw_labels(*a, **k)) or placed)
    drawn = np.asarray(render(sample)).astype(int)
    monkeypatch.setattr(overlay, "_draw_labels", lambda *a, **k: [])
    bare = np.asarray(render(sample)).astype(int)  # the same overlay without labels and leader lines
    w, h = overlay.overlay_size(sample.meta.width, sample.meta.height)
    assert len(placed) == len(masks)
    assert sum(p.leader is not None for p in placed) >= len(masks) - 1  # crowded: labels moved out, lines back
    hidden = (bare[:h] - drawn[:h]).sum(axis=2) > 200  # under a label's dark box
    for k, m in enumerate(masks[1:], start=1):
        scaled = np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST))
        assert not any(scaled[y0:y1, x0:x1].any() for x0, y0, x1, y1 in (p.box for p in placed))
        # a label centred on the object (the old layout) hid all of it; leader lines only cross it
        assert hidden[scaled].mean() < 0.1, f"segment {k} is hidden under labels"


def overlap(box, others) -> np.ndarray:
    return overlay._overlap_matrix(np.asarray([box]), np.asarray(others).reshape(-1, 4))[0]


def test_layout_moves_labels_off_masks_and_draws_leader_lines():
    anchors = [(100 + 10 * i, 100) for i in range(6)]  # six small objects side by side
    keep = [(x - 4, y - 4, x + 5, y + 5) for x, y in anchors]
    placements = layout_labels([(120, 20)] * 6, anchors, keep, (400, 300))
    assert all(p is not None for p in placements)
    boxes = [p.box for p in placements]
    for i, (a, p) in enumerate(zip(anchors, placements, strict=True)):
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 and 0 <= y0 and x1 <= 400 and y1 <= 300
        assert not overlap(p.box, keep).any()  # no object under a label
        assert not overlap(p.box, [b for j, b in enumerate(boxes) if j != i]).any()
        assert p.leader is not None and p.leader[1] == a  # the line ends on the object
        ex, ey = p.leader[0]
        assert x0 <= ex < x1 and y0 <= ey < y1  # ... and starts on the label
    assert layout_labels([(500, 20)], [(10, 10)], [], (400, 300)) == [None]  # no spot: the caller shortens it


def test_layout_of_hundreds_of_segments_is_fast():
    rng = np.random.default_rng(0)
    anchors = [tuple(int(v) for v in p) for p in rng.integers(0, 1200, (300, 2))]
    keep = [(x - 3, y - 3, x + 4, y + 4) for x, y in anchors]
    start = time.perf_counter()
    placements = layout_labels([(90, 18)] * 300, anchors, keep, (1600, 1200))
    assert time.perf_counter() - start < 3.0
    boxes = np.asarray([p.box for p in placements if p is not None])
    assert len(boxes) > 200
    hits = overlay._overlap_matrix(boxes, boxes)
    assert hits.sum() == len(boxes)  # each box overlaps only itself


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil_abs", "sub/../../evil"])
def test_inspect_never_writes_outside_output(tmp_path, name):
    meta, image, _ = make_sample(0)
    members = [(f"{name}.json", json.dumps(meta.to_dict()).encode()), (f"{name}.png", image)]
    members += sample_members(make_sample(1)[0], make_sample(1)[1])
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "shard-000000.tar", members)
    out = tmp_path / "a" / "b" / "png"
    written = overlay.inspect(tmp_path / "shards", out)
    assert [p.name for p in written] == ["test_1.png"]
    assert list(tmp_path.rglob("*.png")) == [out / "test_1.png"]
    assert not Path("/tmp/evil_abs.png").exists()
