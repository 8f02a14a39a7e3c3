"""The real run's CLIP path: ``open_clip.create_model(name, pretrained=FILE, force_image_size=...)``.

Real configs name an open_clip model and its weights; tests otherwise build the tiny CLIP directly.
Here the tiny CLIP's weights are saved to a file, its architecture registered with open_clip as a
model config JSON, and the USE model built from a ``pretrained`` config goes through open_clip's
own factory and checkpoint loader, as ``ViT-L-14-336-quickgelu`` + ``openai`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainer.model import ModelConfig, USEModel

TINY = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "model-tiny.yaml"
NAME = "use-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny() -> USEModel:
    return USEModel(ModelConfig.from_yaml(TINY))


@pytest.fixture(scope="module")
def saved(tiny: USEModel, tmp_path_factory) -> tuple[Path, Path]:
    """(weights file, model config JSON) of the tiny CLIP, as open_clip's own files look."""
    d = tmp_path_factory.mktemp("clip")
    t = ModelConfig.from_yaml(TINY).clip.tiny
    cfg = {"embed_dim": t.embed_dim,
           "vision_cfg": {"image_size": t.image_size, "layers": t.vision_layers, "width": t.vision_width,
                          "head_width": t.vision_head_width, "patch_size": t.patch_size},
           "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.text_width,
                        "heads": t.text_heads, "layers": t.text_layers}}
    (d / f"{NAME}.json").write_text(json.dumps(cfg))
    weights = d / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.backbones.clip.state_dict().items()}, str(weights))
    return weights, d / f"{NAME}.json"


def _pretrained_config(saved: tuple[Path, Path], **update) -> ModelConfig:
    weights, model_json = saved
    data = ModelConfig.from_yaml(TINY).to_dict()
    data["clip"] = {"pretrained": {"model_name": NAME, "pretrained": str(weights), "config_file": str(model_json)}}
    return ModelConfig.from_dict({**data, **update})


def _pixels(model: USEModel) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    items = [model.transform(Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))) for _ in range(2)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_pretrained_file_loads_through_open_clip(tiny: USEModel, saved, monkeypatch) -> None:
    import open_clip

    calls = []
    create = open_clip.create_model

    def spy(name, **kwargs):
        calls.append((name, kwargs))
        return create(name, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", spy)
    model = USEModel(_pretrained_config(saved, clip_image_size=64))
    assert calls == [(NAME, {"pretrained": str(saved[0]), "force_image_size": 64})]
    assert (model.grid, model.config.embed_dim, model.config.clip_image_size) == (8, 32, 64)
    px = _pixels(tiny)
    for key, feats in tiny.backbone_features(px).items():
        torch.testing.assert_close(model.backbone_features(px)[key], feats, atol=0, rtol=0)
    torch.testing.assert_close(model.encode_text(["a red circle"]), tiny.encode_text(["a red circle"]))


def test_force_image_size_resizes_the_position_embedding(saved) -> None:
    model = USEModel(_pretrained_config(saved, clip_image_size=48))  # 48 / 8 = a 6x6 grid, pos-embedding interpolated
    assert model.grid == 6 and model.backbones.clip.visual.positional_embedding.shape == (1 + 36, 64)
    feats = model.backbone_features(_pixels(model))
    assert feats["clip.1"].shape == (2, 1 + 36, 64) and feats["dino.1"].shape == (2, 1 + 36, 32)


def test_config_name_must_match_the_registered_file(saved) -> None:
    with pytest.raises(ValueError, match="open_clip names it"):
        ModelConfig.from_dict({"clip": {"pretrained": {"model_name": "other", "config_file": str(saved[1])}}})
