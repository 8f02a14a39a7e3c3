"""Training from the feature cache gives the same loss sequence as training from images.

fp32 cache: equal to float rounding (the backbones run on batches of another size, nothing else
differs). bf16 (the default) and fp16 caches (half the disk): equal within their rounding of the
features. fp16 cannot hold values past 65504: such a feature stops the cache job with its sample
and level named (bf16 holds it), instead of an inf reaching training.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from train_helpers import config, losses

from shards import shard_urls
from trainer.cache import FeatureCacheReader, cache_features, cache_path
from trainer.model.backbones import FrozenBackbones
from trainer.runtime import build_model
from trainer.train import train

STEPS = 4


@pytest.mark.slow
def test_cache_matches_images(synth_shards, tmp_path):
    common = [f"steps={STEPS}"]
    images = tmp_path / "images"
    train(config(*common), synth_shards, images, device="cpu")
    results = {}
    for dtype in ("fp32", "fp16", "bf16"):
        cache = tmp_path / f"cache-{dtype}"
        cfg = config(*common, f"cache_dtype={dtype}", f"cache_dir={cache}", "use_feature_cache=true")
        files = cache_features(cfg, synth_shards, device="cpu")
        assert len(files) == len(shard_urls(synth_shards))
        with safe_open(str(files[0]), framework="pt") as f:
            meta = f.metadata()
            keys = list(f.keys())  # noqa: SIM118
            assert meta["dtype"] == dtype and meta["fingerprint"] == build_model(cfg).config.backbone_fingerprint()
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
        assert diff < {"fp32": 1e-4, "fp16": 1e-3, "bf16": 2e-3}[dtype]


def test_cache_of_another_model_is_refused(synth_shards, tmp_path):
    cfg = config("steps=1", f"cache_dir={tmp_path}", "cache_dtype=fp16")
    url = shard_urls(synth_shards)[0]
    cache_features(cfg, synth_shards, device="cpu")
    assert cache_path(tmp_path, url).exists()
    reader = FeatureCacheReader(tmp_path, fingerprint="another-model")
    with pytest.raises(ValueError, match="another model config"):
        reader.get(url, "synth_1")


def test_fp16_overflow_is_refused_and_bf16_holds_it(synth_shards, tmp_path, monkeypatch):
    original = FrozenBackbones.forward

    def large(self, pixels):  # activations past fp16's range, as large real ViTs produce in a few channels
        return {k: v * 1e5 for k, v in original(self, pixels).items()}

    monkeypatch.setattr(FrozenBackbones, "forward", large)
    fp16 = config("steps=1", f"cache_dir={tmp_path / 'fp16'}", "cache_dtype=fp16")
    with pytest.raises(ValueError, match=r"sample synth_\d+ level clip\.1 overflows fp16"):
        cache_features(fp16, synth_shards, device="cpu")
    assert not list((tmp_path / "fp16").glob("*.safetensors"))  # nothing half-written
    bf16 = config("steps=1", f"cache_dir={tmp_path / 'bf16'}", "cache_dtype=bf16")
    files = cache_features(bf16, synth_shards, device="cpu")
    with safe_open(str(files[0]), framework="pt") as f:
        t = f.get_tensor(next(iter(f.keys())))  # noqa: SIM118
    assert t.dtype == torch.bfloat16 and bool(torch.isfinite(t).all()) and float(t.abs().max()) > 65504
