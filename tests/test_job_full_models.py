"""The full model path end to end on Ray: synthetic images -> tiny LLaVA captions -> real spaCy
phrases -> tiny Grounding DINO boxes -> tiny SAM masks -> mask NMS -> shards the validator accepts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from job_helpers import ROOT, start_ray

import shards
from pipeline.config import load_config
from pipeline.job import run_job


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per actor on 2 cores
    start_ray(num_gpus=0)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_model_path_writes_valid_shards(synth_dir, tmp_path, ray_local):
    from fixtures_models import tiny_model_dirs

    tiny = tiny_model_dirs()
    out = tmp_path / "out"
    cfg = load_config("pipeline/configs/demo.yaml", [
        f"source.images={synth_dir / 'images'}", f"source.annotations={synth_dir / 'instances.json'}",
        f"source.captions={synth_dir / 'captions.json'}", "source.limit=6", "shards.max_samples=4",
        f"captioner.model={tiny.llava}", "captioner.max_new_tokens=6", "captioner.num_cpus=0.25",
        "captioner.batch_size=3",
        "phrases.enabled=true", "phrases.num_cpus=0.25",
        f"grounder.model={tiny.grounding_dino}", "grounder.box_threshold=0.0", "grounder.text_threshold=0.0",
        "grounder.max_boxes_per_image=5", "grounder.num_cpus=0.25", "grounder.batch_size=3",
        f"segmenter.model={tiny.sam}", "segmenter.pred_iou_thresh=0", "segmenter.stability_score_thresh=0",
        "segmenter.min_region_area=0", "segmenter.num_cpus=0.25", "segmenter.batch_size=3",
        "ray.task_cpus=0.25"])
    assert cfg.enabled_stages() == ["captioner", "phrases", "grounder", "segmenter"]
    summary = run_job(cfg, out, progress=False)
    assert summary["images_in"] == 6 and summary["written"] + summary["failed"] == 6
    assert summary["written"] >= 1, shards.read_failures(out).to_pylist()
    # random weights almost never emit EOS within 6 tokens: answers cut at the budget are counted
    assert 0 < summary["captions_cut"] <= 6 * len(cfg.captioner.prompts), summary

    samples = list(shards.iter_samples(out))
    sources = {t.source.split("+")[0] for s in samples for seg in s.meta.segments for t in seg.texts}
    assert "synth" in sources  # annotation masks
    assert any(src.startswith(("llava:", "caption:")) for src in sources), sources  # grounded phrases
    assert any(c.source.startswith("llava:") for s in samples for c in s.meta.captions)
    validate = subprocess.run([sys.executable, "-m", "shards", "validate", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stdout[-2000:] + validate.stderr[-2000:]
