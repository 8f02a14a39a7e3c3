"""``USEModel.embed_masks``: the segments of an image embedded exactly as the trainer embeds them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards import iter_samples, shard_urls
from shards import rle as rle_utils
from trainer import USEModel
from trainer.data import SampleProcessor, collate
from trainer.model import ModelConfig

TINY = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "model-tiny.yaml"


@pytest.fixture(scope="module")
def model() -> USEModel:
    torch.manual_seed(0)
    m = USEModel(ModelConfig.from_yaml(TINY))
    with torch.no_grad():  # away from the init so that any difference in the inputs shows
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def _trainer_path(model: USEModel, sample) -> torch.Tensor:
    """What a training step computes for this sample: SampleProcessor -> collate -> segment embeddings."""
    proc = SampleProcessor(transform=model.transform, grid=model.grid, max_segments=10**6, min_area=0)
    batch = collate([proc(sample, random.Random(0))])
    with torch.no_grad():
        return model.segment_embeddings(model.backbone_features(batch["pixels"]), batch["area_weights"],
                                        batch["image_index"])


def test_embed_masks_equals_the_training_path(model: USEModel, synth_shards) -> None:
    samples = list(iter_samples(shard_urls(synth_shards)[0]))[:3]
    for sample in samples:
        rles = [s.rle for s in sample.meta.segments]
        ref = _trainer_path(model, sample)
        from_rle = model.embed_masks(sample.image(), rles)
        from_bool = model.embed_masks(sample.image(), rle_utils.decode(rles))  # numpy bool [S, H, W]
        assert from_rle.shape == (len(rles), 32) and from_rle.dtype == torch.float32
        torch.testing.assert_close(from_rle, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_bool, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_rle.norm(dim=-1), torch.ones(len(rles)))
    batched = model.embed_masks_batch([s.image() for s in samples], [[x.rle for x in s.meta.segments] for s in samples],
                                      batch_size=2)
    for sample, got in zip(samples, batched, strict=True):
        torch.testing.assert_close(got, model.embed_masks(sample.image(), [x.rle for x in sample.meta.segments]),
                                   atol=1e-5, rtol=0)


def test_empty_masks_give_zero_rows(model: USEModel) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8))
    masks = torch.zeros(3, 30, 45, dtype=torch.bool)
    masks[0, 2:10, 5:20] = True
    masks[2, 20:, 30:] = True
    emb = model.embed_masks(image, masks)
    assert emb.shape == (3, 32)
    assert torch.all(emb[1] == 0)
    torch.testing.assert_close(emb[[0, 2]].norm(dim=-1), torch.ones(2))
    only = model.embed_masks(image, masks[[0, 2]])  # the empty row changes nothing for the others
    torch.testing.assert_close(emb[[0, 2]], only, atol=1e-6, rtol=0)
    assert model.embed_masks(image, np.zeros((0, 30, 45), dtype=bool)).shape == (0, 32)


def test_masks_of_another_size_are_refused(model: USEModel) -> None:
    image = Image.new("RGB", (45, 30))
    with pytest.raises(ValueError, match="45x30"):
        model.embed_masks(image, np.ones((1, 45, 30), dtype=bool))
