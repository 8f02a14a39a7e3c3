"""The trained model names held-out segments: top-1 among all class texts, far above chance.

Tiny random frozen backbones, trained on the 40 training images of the synthetic dataset (six
classes, each a distinct colour and shape: chance is 1/6), evaluated on the 24 held-out images:
every segment of them is embedded and assigned to the closest class-name text embedding.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from train_helpers import config, losses

from pipeline.synth import CLASSES
from shards import iter_samples
from trainer.cache import cache_features
from trainer.model import USEModel, area_weights_from_rle
from trainer.runtime import build_model
from trainer.train import train


def majority_share(val_shards) -> float:
    """The accuracy of always naming the most frequent held-out class: chance, class imbalance included."""
    counts = Counter(s.texts[0].text for sample in iter_samples(val_shards) for s in sample.meta.segments)
    return max(counts.values()) / sum(counts.values())


def accuracy(model: USEModel, val_shards) -> tuple[float, int]:
    model.eval()
    classes = model.encode_text(list(CLASSES))
    right = total = 0
    with torch.no_grad():
        for sample in iter_samples(val_shards):
            segs = sample.meta.segments
            pixels = {k: v[None] for k, v in model.transform(sample.image()).items()}
            weights = area_weights_from_rle([s.rle for s in segs], model.grid)
            emb = model.segment_embeddings(model.backbone_features(pixels), weights, torch.zeros(len(segs), dtype=torch.long))
            predicted = (emb @ classes.T).argmax(dim=1).tolist()
            right += sum(CLASSES[p] == s.texts[0].text for p, s in zip(predicted, segs, strict=True))
            total += len(segs)
    return right / total, total


@pytest.mark.slow
def test_held_out_segments_get_their_class(synth_shards, synth_val_shards, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    cfg = config("steps=60", "data.batch_size=8", "data.workers=1", "data.max_segments_per_image=16",
                 "optim.warmup_steps=4", "log_every=10", "use_feature_cache=true", f"cache_dir={tmp_path / 'cache'}")
    cache_features(cfg, synth_shards, device="cpu")
    t1 = time.perf_counter()
    train(cfg, synth_shards, out, device="cpu")
    print(f"cache {t1 - t0:.1f} s, train {time.perf_counter() - t1:.1f} s")
    loss = losses(out)
    acc, n = accuracy(USEModel.from_pretrained(out / "final"), synth_val_shards)
    chance = max(1 / len(CLASSES), majority_share(synth_val_shards))
    untrained, _ = accuracy(build_model(cfg), synth_val_shards)
    print(f"loss {loss[0]:.3f} -> {loss[-1]:.3f}; held-out top-1 accuracy {acc:.3f} on {n} segments "
          f"(chance {chance:.3f}: uniform {1 / len(CLASSES):.3f}, majority class {majority_share(synth_val_shards):.3f}; "
          f"untrained model {untrained:.3f})")
    assert chance <= 0.25
    assert acc >= 0.9
