"""Training from the feature cache gives the same loss sequence as training from images.

fp32 cache: equal to float rounding (the backbones run on batches of another size, nothing else
differs). The cache also holds the frozen text tower's embeddings of every segment text: a step from
the cache reads them instead of running the tower, with the live step's loss and gradient. bf16 (the default) and fp16 caches (half the disk): equal within their rounding of the
features. fp16 cannot hold values past 65504: such a feature stops the cache job with its sample
and level named (bf16 holds it), instead of an inf reaching training.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from train_helpers import config, losses

from shards import iter_samples, shard_urls
from trainer.cache import TEXT_EMB, TEXT_IDS, FeatureCacheReader, cache_features, cache_path, sample_texts
from trainer.data import make_loader
from trainer.model import SegmentTextLoss, USEModel, text_ids
from trainer.model.backbones import FrozenBackbones
from trainer.runtime import build_model
from trainer.train import Trainer, make_processor, train

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
            keys = [k for k in f.keys() if k.split("/")[1] not in (TEXT_EMB, TEXT_IDS)]  # noqa: SIM118
            assert meta["dtype"] == dtype and meta["fingerprint"] == build_model(cfg).config.backbone_fingerprint()
            assert len(keys) == int(meta["samples"]) * 5  # 3 CLIP + 2 DINOv2 levels in model-tiny.yaml
            assert f.get_tensor(keys[0]).shape == (1 + 8 * 8, 64 if keys[0].split("/")[1].startswith("clip") else 32)
            assert f.get_tensor(f"{keys[0].split('/')[0]}/{TEXT_EMB}").dtype == torch.float32  # whatever dtype
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


def _grads(model: USEModel, batch: dict, text_emb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and trainable gradients of one step from the cached features with the given text embeddings."""
    model.zero_grad(set_to_none=True)
    seg, scale = model(batch["features"], batch["area_weights"], batch["image_index"], return_logit_scale=True)
    loss = SegmentTextLoss(rank=0, world_size=1)(seg, text_emb, scale, text_ids=text_ids(batch["texts"]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_trainable_parameters()}


def test_cached_text_embeddings_give_the_live_loss_and_gradient(synth_shards, tmp_path, monkeypatch):
    cfg = config("steps=2", f"cache_dir={tmp_path / 'cache'}", "cache_dtype=fp32", "use_feature_cache=true")
    cache_features(cfg, synth_shards, device="cpu")
    model = build_model(cfg)
    urls = shard_urls(synth_shards)
    batch = next(iter(make_loader(urls, cfg.data, make_processor(cfg, model, synth_shards), seed=0, epoch=0,
                                  batches=1)))
    assert batch["text_emb"].shape == (len(batch["texts"]), 32)
    live = model.encode_text(batch["texts"])
    torch.testing.assert_close(batch["text_emb"], live, rtol=0, atol=1e-6)
    loss_cached, grads_cached = _grads(model, batch, batch["text_emb"])
    loss_live, grads_live = _grads(model, batch, live)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-6, atol=0)
    for name, g in grads_live.items():
        torch.testing.assert_close(grads_cached[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # the comparison can fail: the same rows in another order give another loss
    shuffled, _ = _grads(model, batch, batch["text_emb"].roll(1, dims=0))
    assert abs(float(shuffled) - float(loss_live)) > 1e-3

    # the cache step never runs the text tower, and trains as from the live texts
    def no_tower(self, texts):
        raise AssertionError("text tower run during a step from the cache")

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(USEModel, "encode_text", no_tower)
        assert Trainer(cfg, synth_shards, out, device="cpu").run()["steps"] == 2
    live_run = tmp_path / "live"
    with monkeypatch.context() as m:
        m.setattr(FeatureCacheReader, "text_embeddings", lambda self, *a: None)  # as a cache without texts
        train(cfg, synth_shards, live_run, device="cpu")
    for a, b in zip(losses(out), losses(live_run), strict=True):
        assert abs(a - b) < 1e-5


def test_a_text_missing_from_the_cache_is_named(synth_shards, tmp_path):
    cfg = config("steps=1", f"cache_dir={tmp_path}")
    cache_features(cfg, synth_shards, device="cpu")
    url = shard_urls(synth_shards)[0]
    sample = next(iter(iter_samples(url)))
    reader = FeatureCacheReader(tmp_path, build_model(cfg).config.backbone_fingerprint())
    texts = sample_texts(sample)
    assert reader.text_embeddings(url, sample.key, texts[::-1]).shape == (len(texts), 32)
    with pytest.raises(KeyError, match=r"text 'a zebrafish' of sample .* rerun `python -m trainer cache-features`"):
        reader.text_embeddings(url, sample.key, [texts[0], "a zebrafish"])
