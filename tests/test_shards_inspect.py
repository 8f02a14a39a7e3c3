"""`inspect` draws every segment on its image; `stats` summarises a directory from its stats files."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from shards_util import make_sample, write_dataset

import shards
from shards import cli
from shards.overlay import inspect, overlay_size, scaled_image
from shards.stats import summarize
from shards.writer import stats_path


def test_inspect_writes_one_overlay_per_sample(tmp_path):
    masks_by_key = write_dataset(tmp_path / "shards", 3, max_samples=2)
    paths = inspect(tmp_path / "shards", tmp_path / "png")
    assert sorted(p.name for p in paths) == sorted(f"{k}.png" for k in masks_by_key)
    for sample in shards.iter_samples(tmp_path / "shards"):
        w, h = overlay_size(sample.meta.width, sample.meta.height)
        assert min(w, h) >= 512  # a 40x30 image is upscaled to stay legible
        png = Image.open(tmp_path / "png" / f"{sample.key}.png")
        assert png.mode == "RGB" and png.width == w and png.height > h  # image on top, legend below
        drawn = np.asarray(png)[:h].astype(int)
        original = np.asarray(scaled_image(sample)).astype(int)
        changed = np.abs(drawn - original).sum(axis=2) > 10
        masks = masks_by_key[sample.key]
        inside = np.zeros((h, w), dtype=bool)
        for m in masks:
            scaled = np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST))
            assert changed[scaled].mean() > 0.95  # every segment is tinted (labels only add to that)
            inside |= scaled
        assert changed[~inside].mean() < 0.5  # the rest of the image stays visible (only labels on it)


def test_inspect_cli_limit(tmp_path, capsys):
    write_dataset(tmp_path / "shards", 5, max_samples=2)
    code = cli.main(["inspect", str(tmp_path / "shards"), "--out", str(tmp_path / "png"), "--limit", "2",
                     "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["test_0.png", "test_1.png"]
    assert "wrote 2 overlay(s)" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "none"), "--out", str(tmp_path / "png")]) == 2


def test_inspect_synthetic_dataset(synth_val_shards, tmp_path):
    paths = inspect(synth_val_shards, tmp_path, limit=2)
    assert len(paths) == 2 and all(Image.open(p).width >= 512 for p in paths)


def test_stats_summary(tmp_path, capsys):
    out = tmp_path / "shards"
    with shards.ShardWriter(out, max_samples=2) as writer:
        for i in range(3):
            writer.write(*make_sample(i, n_segments=i + 1)[:2])
        writer.add_failure("test_9", "download", "404")
    expected = {"shards": 2, "images": 3, "segments": 6, "texts": 12, "failures": 1,
                "segments_per_image": {"mean": 2.0, "min": 1, "max": 3}, "texts_per_segment": {"mean": 2.0},
                "text_sources": {"synth": 6, "caption:synth": 6}, "image_sources": {"test": 3}}
    assert cli.main(["stats", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {k: summary[k] for k in expected} == expected
    assert summary["shards_without_stats"] == []

    stats_path(out / "shard-000001.tar").unlink()  # falls back to reading the tar (its failure is lost)
    summary = summarize(out)
    assert summary["shards_without_stats"] == ["shard-000001.tar"]
    assert {k: summary[k] for k in expected} == {**expected, "failures": 0}
