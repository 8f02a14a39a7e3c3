"""`make eval-ade20k` on the 3 shared ADE images with a trained demo-size model, on CPU, end to end;
and `python -m evaluation demo-summary` on the files `make demo` leaves."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from evaluation.demo_summary import summarize_demo
from evaluation.tiny_sam import build_tiny_sam

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_eval_ade20k_on_shared_sample(shared_data, synth_model_dir, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    sam = build_tiny_sam(tmp_path / "tiny-sam")
    # -o setup: use the environment as it is (never reinstall from a test); the tiny SAM stands in for ViT-H
    args = ["make", "-s", "-o", "setup", "eval-ade20k", f"ADE20K_ROOT={shared_data / 'ade20k_sceneparsing_val'}",
            f"CKPT={synth_model_dir}", f"EVAL_OUT={tmp_path / 'eval'}",
            f"ARGS=-q --save-predictions sam.model={sam} sam.device=cpu device=cpu sam.points_per_side=4 "
            "sam.pred_iou_thresh=0 sam.stability_score_thresh=0 ray.num_cpus=0.5 ray.local_num_cpus=2"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "eval/ade20k-150"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["images"] == 3 and not doc["failed_images"] and doc["num_classes"] == 150
    assert doc["settings"]["resize"]["short_side"] == 640 and doc["settings"]["prompts"]["templates_used"] == 80
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"ADE_val_0000000{i}.png" for i in (1, 2, 3)]
    assert len(list((out / "overlays").iterdir())) == 3 and (out / "results.md").is_file()
    assert "ade20k-150: mIoU" in run.stdout


def test_demo_summary_gathers_the_figures(tmp_path):
    demo = tmp_path / "demo"
    (demo / "shards").mkdir(parents=True)
    (demo / "shards/summary.json").write_text(json.dumps({"written": 64, "failed": 0, "segments": 190, "texts": 190,
                                                          "shards": 4}))
    (demo / "train").mkdir()
    (demo / "train/metrics.jsonl").write_text('{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 0.5}\n')
    for name, miou in (("oracle", 0.9), ("sam", 0.2)):
        (demo / f"eval-{name}").mkdir()
        (demo / f"eval-{name}/metrics.json").write_text(json.dumps({"mIoU": miou, "images": 64}))
    (demo / "timings.jsonl").write_text('{"stage": "train", "seconds": 12345e-3}\n')
    s = summarize_demo(demo)
    assert (s["images"], s["segments"], s["texts"]) == (64, 190, 190)
    assert s["final_loss"] == {"step": 20, "loss": 0.5} and s["oracle_mIoU"] == 0.9 and s["sam_mIoU"] == 0.2
    assert s["wall_time_s"] == {"train": 12.345} and s["notes"] == []
    (demo / "eval-sam/metrics.json").unlink()
    assert summarize_demo(demo)["sam_mIoU"] is None and "eval-sam" in summarize_demo(demo)["notes"][0]
