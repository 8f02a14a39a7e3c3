"""Oracle mode (ground-truth segments as masks): the ADE sample with a model that knows the answer, the
synthetic model on held-out images, and a restarted run that reuses its per-image results."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SYNTH_VAL_IDS
from eval_helpers import GroundTruthModel
from PIL import Image

from evaluation.config import CONFIG_DIR, EvalConfig
from evaluation.datasets import open_dataset
from evaluation.predict import Predictor, load_predictor
from evaluation.semseg import evaluate_semseg

LOCAL = ["ray.enabled=false", "prompts.templates=identity"]


def _gt_predictor(ds, permutation=None):
    cfg = EvalConfig.from_yaml(None, LOCAL)
    model = GroundTruthModel(ds, permutation=permutation)
    predictor = Predictor(cfg, ds, model, oracle=True)
    model.attach(predictor)
    return cfg, predictor


def test_oracle_true_class_gives_miou_one_on_ade_sample(shared_data, tmp_path):
    root = shared_data / "ade20k_sceneparsing_val"
    ds = open_dataset("ade20k-150", root)
    cfg, predictor = _gt_predictor(ds)
    doc = evaluate_semseg(cfg, "ade20k-150", root, "ground-truth-model", tmp_path / "run", oracle=True,
                          save_predictions=True, predictor=predictor, progress=False)
    assert doc["mIoU"] == 1.0 and doc["pAcc"] == 1.0 and doc["images"] == 3 and not doc["failed_images"]
    written = json.loads((tmp_path / "run/metrics.json").read_text())
    assert written["per_class_iou"]["wall"] == 1.0 and written["per_class_iou"]["bed"] is None  # no bed in the sample
    assert written["settings"]["oracle"] and written["settings"]["prompts"]["templates"] == "identity"
    assert "| mIoU |" in (tmp_path / "run/results.md").read_text()
    for s in ds.samples:  # predictions in the raw release's encoding: equal to the labels where labelled
        pred = np.asarray(Image.open(tmp_path / "run/predictions" / f"{s.key}.png"))
        raw = np.asarray(Image.open(s.label))
        assert pred.dtype == np.uint8 and (pred[raw > 0] == raw[raw > 0]).all()
        assert (tmp_path / "run/overlays" / f"{s.key}.png").is_file()

    perm = np.random.default_rng(0).permutation(150)
    cfg, permuted = _gt_predictor(ds, permutation=perm)
    doc = evaluate_semseg(cfg, "ade20k-150", root, "permuted-model", tmp_path / "perm", oracle=True,
                          predictor=permuted, progress=False)
    assert doc["mIoU"] < 0.05


def test_restart_reuses_per_image_results(shared_data, tmp_path):
    root = shared_data / "ade20k_sceneparsing_val"
    ds = open_dataset("ade20k-150", root)
    cfg, predictor = _gt_predictor(ds, permutation=np.roll(np.arange(150), 1))
    first = evaluate_semseg(cfg, "ade20k-150", root, "m", tmp_path, oracle=True, limit=2, predictor=predictor,
                            progress=False)
    calls = []
    original = predictor.evaluate
    predictor.evaluate = lambda sample, **kw: calls.append(sample.key) or original(sample, **kw)
    full = evaluate_semseg(cfg, "ade20k-150", root, "m", tmp_path, oracle=True, predictor=predictor, progress=False)
    assert calls == ["ADE_val_00000003"]  # the two finished images were read back, not recomputed
    again = evaluate_semseg(cfg, "ade20k-150", root, "m", tmp_path, oracle=True, limit=2, predictor=predictor,
                            progress=False)
    assert again["mIoU"] == first["mIoU"] and full["images"] == 3 and calls == ["ADE_val_00000003"]
    other = EvalConfig.from_yaml(None, [*LOCAL, "prompts.combine=max"])  # another setting: another fingerprint
    evaluate_semseg(other, "ade20k-150", root, "m", tmp_path, oracle=True, limit=1, predictor=predictor, progress=False)
    assert calls[-1] == "ADE_val_00000001" and len(list((tmp_path / "per_image").iterdir())) == 2


def test_bad_image_is_reported_and_the_run_goes_on(shared_data, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(shared_data / "ade20k_sceneparsing_val", root)
    (root / "images/validation/ADE_val_00000002.jpg").write_bytes(b"not a jpeg")
    ds = open_dataset("ade20k-150", root)
    cfg, predictor = _gt_predictor(ds)
    doc = evaluate_semseg(cfg, "ade20k-150", root, "m", tmp_path / "run", oracle=True, predictor=predictor,
                          progress=False)
    assert doc["images"] == 2 and doc["mIoU"] == 1.0
    assert [f["key"] for f in doc["failed_images"]] == ["ADE_val_00000002"]


@pytest.mark.slow
def test_synth_model_oracle_miou_on_held_out_images(synth_dir, synth_model_dir, tmp_path):
    root = tmp_path / "semantic"
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    for i in SYNTH_VAL_IDS:  # the 24 images the model never trained on
        stem = f"synth_{i - 1:06d}"
        shutil.copy(synth_dir / "semantic/images/validation" / f"{stem}.jpg", root / "images/validation")
        shutil.copy(synth_dir / "semantic/annotations/validation" / f"{stem}.png", root / "annotations/validation")
    shutil.copy(synth_dir / "semantic/classes.json", root)
    cfg = EvalConfig.from_yaml(CONFIG_DIR / "demo.yaml", ["ray.enabled=false"])
    ds = open_dataset("synth", root)
    predictor = load_predictor(cfg, ds, str(synth_model_dir), oracle=True, cache_root=None)
    doc = evaluate_semseg(cfg, "synth", root, str(synth_model_dir), tmp_path / "run", oracle=True, predictor=predictor,
                          progress=False)
    assert doc["images"] == 24
    assert doc["mIoU"] >= 0.8, doc["per_class_iou"]
