"""Training from the feature cache gives the same loss sequence as training from images.

fp32 cache: equal to float rounding (the backbones run on batches of another size, nothing else
differs). fp16 cache (the default, half the disk): equal within fp16 rounding of the features.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open
from train_helpers import config, losses

from shards import shard_urls
from trainer.cache import cache_features, fingerprint
from trainer.data import FeatureCacheReader, cache_path
from trainer.train import build_model, train

STEPS = 4


def test_cache_matches_images(synth_shards, tmp_path):
    common = [f"steps={STEPS}"]
    images = tmp_path / "images"
    train(config(*common), synth_shards, images, device="cpu")
    results = {}
    for dtype in ("fp32", "fp16"):
        cache = tmp_path / f"cache-{dtype}"
        cfg = config(*common, f"cache_dtype={dtype}", f"cache_dir={cache}", "use_feature_cache=true")
        files = cache_features(cfg, synth_shards, device="cpu")
        assert len(files) == len(shard_urls(synth_shards))
        with safe_open(str(files[0]), framework="pt") as f:
            meta = f.metadata()
            keys = list(f.keys())  # noqa: SIM118
            assert meta["dtype"] == dtype and meta["fingerprint"] == fingerprint(build_model(cfg).config)
            assert len(keys) == int(meta["samples"]) * 5  # 3 CLIP + 2 DINOv2 levels in model-tiny.yaml
            assert f.get_tensor(keys[0]).shape == (1 + 8 * 8, 64 if keys[0].split("/")[1].startswith("clip") else 32)
        assert cache_features(cfg, synth_shards, device="cpu") == files  # up to date: nothing recomputed
        out = tmp_path / f"from-{dtype}"
        train(cfg, synth_shards, out, device="cpu")
        results[dtype] = losses(out)
    ref = losses(images)
    print("from images:", [round(x, 6) for x in ref])
    for dtype, got in results.items():
        diff = max(abs(a - b) for a, b in zip(ref, got, strict=True))
        print(f"from {dtype} cache:", [round(x, 6) for x in got], f"max |diff| {diff:.2g}")
        assert len(got) == STEPS
        assert diff < (1e-4 if dtype == "fp32" else 1e-3)


def test_cache_of_another_model_is_refused(synth_shards, tmp_path):
    cfg = config("steps=1", f"cache_dir={tmp_path}", "cache_dtype=fp16")
    url = shard_urls(synth_shards)[0]
    cache_features(cfg, synth_shards, device="cpu")
    assert cache_path(tmp_path, url).exists()
    reader = FeatureCacheReader(tmp_path, fingerprint="another-model")
    with pytest.raises(ValueError, match="another model config"):
        reader.get(url, "synth_1")
