"""evaluation.proposals and evaluation.proposal_cache on the tiny SAM: defaults, fingerprint, cache round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures_models import tiny_model_dirs
from segment_anything import SamAutomaticMaskGenerator

from evaluation.proposal_cache import ProposalCache
from evaluation.proposals import AMGConfig, MaskGenerator
from shards import rle as rle_utils


@pytest.fixture(scope="module")
def generator() -> MaskGenerator:
    return MaskGenerator.load(AMGConfig(model=str(tiny_model_dirs().sam), points_per_side=4, pred_iou_thresh=0,
                                        stability_score_thresh=0, box_nms_thresh=1.0))


def test_defaults_are_segment_anythings():
    reference = SamAutomaticMaskGenerator.__init__.__defaults__
    names = SamAutomaticMaskGenerator.__init__.__code__.co_varnames[2:2 + len(reference)]
    defaults = dict(zip(names, reference, strict=True))
    config = AMGConfig()
    for name in ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                 "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                 "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area"):
        assert getattr(config, name) == defaults[name], name


def test_generate_returns_rle_records(generator):
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    proposals = generator.generate(image)
    assert len(proposals) > 0
    for p in proposals:
        assert set(p) == {"rle", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"}
        mask = rle_utils.decode(p["rle"])
        assert mask.shape == (30, 50) and p["area"] == int(mask.sum()) and isinstance(p["rle"]["counts"], str)
        assert p["crop_box"] == [0, 0, 50, 30] and len(p["point_coords"]) == 1
        if p["area"]:
            ys, xs = np.nonzero(mask)
            assert p["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    json.dumps(proposals)  # JSON-able as the cache stores it
    with pytest.raises(ValueError, match="uint8"):
        generator.generate(image.astype(np.float32))


def test_fingerprint_follows_weights_and_settings_not_paths(generator, tmp_path):
    same = MaskGenerator.load(generator.config.model_copy(update={"points_per_batch": 7, "mask_pixel_budget": 10}))
    assert same.fingerprint() == generator.fingerprint()  # batching changes no output
    other = MaskGenerator.load(generator.config.model_copy(update={"pred_iou_thresh": 0.5}))
    assert other.fingerprint() != generator.fingerprint()
    copy = shutil.copytree(tiny_model_dirs().sam, tmp_path / "elsewhere")
    moved = MaskGenerator.load(generator.config.model_copy(update={"model": str(copy)}))
    assert moved.fingerprint() == generator.fingerprint()  # same weights in another directory
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte
    weights.write_bytes(bytes(data))
    changed = MaskGenerator.load(generator.config.model_copy(update={"model": str(copy)}))
    assert changed.fingerprint() != generator.fingerprint()


def test_proposal_cache_round_trip_and_bad_files(generator, tmp_path, caplog):
    proposals = generator.generate(np.full((20, 24, 3), 128, np.uint8))
    cache = ProposalCache(tmp_path, generator.fingerprint())
    key = "validation/ADE_val_00000001"
    assert cache.get(key) is None
    path = cache.put(key, proposals)
    assert path.parent == tmp_path / generator.fingerprint() and "/" not in path.name
    assert cache.get(key) == proposals
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert ProposalCache(tmp_path, "other").get(key) is None  # another fingerprint, another folder
    assert cache.get("validation_ADE_val_00000001") is None  # keys that sanitise alike do not collide
    path.write_text('{"image_key": "validation/ADE_val_00000001", "fingerprint": "x", "proposals": []}')
    assert cache.get(key) is None
    path.write_text("{not json")
    assert cache.get(key) is None and "unreadable" in caplog.text
    with pytest.raises(ValueError, match="fingerprint"):
        ProposalCache(tmp_path, "../escape")
