"""The full path with the tiny SAM: CLI -> Ray Data actors -> SAM proposals (cached) -> USE -> vote -> files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.cli import main
from evaluation.tiny_sam import build_tiny_sam

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> Path:
    return build_tiny_sam(tmp_path_factory.mktemp("tiny_sam") / "sam")


@pytest.mark.slow
def test_sam_path_end_to_end_on_ray(synth_dir, synth_model_dir, tiny_sam, tmp_path, ray_local, capsys):
    out = tmp_path / "run"
    args = ["semseg", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", str(synth_model_dir),
            "--output", str(out), "--config", str(ROOT / "evaluation/configs/demo.yaml"), "--limit", "6",
            "--save-predictions", "-q", f"sam.model={tiny_sam}", "overlays=2"]
    assert main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["images"] == 6 and not doc["failed_images"] and 0 <= doc["mIoU"] <= 1
    assert doc["settings"]["masks"].startswith("SAM") and doc["settings"]["sam"]["points_per_side"] == 8
    assert doc["settings"]["resize"]["short_side"] == 0
    assert set(doc["per_class_iou"]) == {"red circle", "blue square", "green triangle", "yellow star",
                                         "purple diamond", "orange cross"}
    assert "mIoU" in (out / "results.md").read_text()
    assert len(list((out / "overlays").glob("*.png"))) == 2
    preds = sorted((out / "predictions").glob("*.png"))
    assert [p.stem for p in preds] == [f"synth_{i:06d}" for i in range(6)]
    label = np.asarray(Image.open(synth_dir / "semantic/annotations/validation/synth_000000.png"))
    pred = np.asarray(Image.open(preds[0]))
    assert pred.shape == label.shape and pred.dtype == np.uint8 and 1 <= pred.min() and pred.max() <= 6
    cached = list((out / "proposals").rglob("*.json"))
    assert len(cached) == 6 and all(json.loads(p.read_text())["proposals"] for p in cached)
    assert "synth: mIoU" in capsys.readouterr().out

    # a restart with the same command recomputes nothing: results and proposals are read back
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    shutil.rmtree(out / "per_image")  # force re-evaluation: SAM must come from the cache
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    assert json.loads((out / "metrics.json").read_text())["mIoU"] == doc["mIoU"]


def test_missing_inputs_stop_with_one_line(synth_dir, tmp_path, capsys):
    base = ["semseg", "--dataset", "synth", "--root", str(synth_dir), "--output", str(tmp_path / "o"), "-q"]
    assert main([*base, "--checkpoint", str(tmp_path / "no-model")]) == 2
    assert "no-model" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main([*base, "--checkpoint", str(model), f"sam.model={tmp_path / 'no-sam'}"]) == 2
    err = capsys.readouterr().err
    assert "no-sam" in err and "python -m pipeline models download" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--checkpoint", str(model), "sam.point_per_side=3"]) == 2
    assert "did you mean 'sam.points_per_side'" in capsys.readouterr().err


def test_help_lists_every_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "evaluation", "--help"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0
    for cmd in ("semseg", "prepare", "tiny-sam"):
        assert cmd in out.stdout
