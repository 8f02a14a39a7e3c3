"""USEModel on tiny random backbones: trainability, shapes, save/load, transforms, learning."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from trainer.model import ImageTransform, ModelConfig, SegmentTextLoss, USEModel, area_weights
from trainer.model.area_weights import resample_matrix
from trainer.model.backbones import _to_grid
from trainer.model.transforms import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

TINY = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "model-tiny.yaml"


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_yaml(TINY)


@pytest.fixture(scope="module")
def model(config: ModelConfig) -> USEModel:
    return USEModel(config)


def _pixels(model: USEModel, n: int = 2) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]
    items = [model.transform(im) for im in imgs]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _segments(grid: int, s_per_image: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(sum(s_per_image), 30, 30, generator=gen) > 0.6
    idx = torch.cat([torch.full((s,), b) for b, s in enumerate(s_per_image)])
    return area_weights(masks, grid), idx


def test_only_lln_scales_head_and_temperature_train(model: USEModel) -> None:
    names = [n for n, _ in model.named_trainable_parameters()]
    assert all(n.split(".")[0] in {"lln", "patch_scales", "head", "logit_scale"} for n in names)
    assert {"patch_scales", "logit_scale", "head.weight"} <= set(names)
    n_levels = len(model.config.clip_layers) + len(model.config.dino_layers)
    assert len(model.lln) == n_levels and model.patch_scales.shape == (n_levels,)
    for key in model.lln:  # each LLN: a learnable LayerNorm (affine) and a learnable linear map
        assert {f"lln.{key}.{p}" for p in ("norm.weight", "norm.bias", "proj.weight", "proj.bias")} <= set(names)
    assert len(names) == 4 * n_levels + 4  # + patch_scales, head.weight, head.bias, logit_scale: nothing else
    assert all(not p.requires_grad for p in model.backbones.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.trainable_parameters()}


def test_backward_leaves_backbones_without_grad(model: USEModel) -> None:
    model.train()
    assert not model.backbones.training and not model.backbones.clip.training and model.head.training
    weights, idx = _segments(model.grid, (3, 2))
    emb = model(_pixels(model), weights, idx)
    txt = model.encode_text(["a", "b", "c", "d", "e"])
    SegmentTextLoss()(emb, txt, model.logit_scale_exp()).backward()
    assert all(p.grad is None for p in model.backbones.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.zero_grad(set_to_none=True)


def test_feature_shapes_with_different_grids(model: USEModel) -> None:
    assert model.grid == 8 and model.config.dino_patch_size == 14  # CLIP 64/8 = 8, DINOv2 56/14 = 4
    feats = model.backbone_features(_pixels(model, 3))
    assert set(feats) == {"clip.1", "clip.2", "clip.3", "dino.1", "dino.2"}
    for key, f in feats.items():
        assert f.shape == (3, 1 + 64, 64 if key.startswith("clip") else 32)
    assert model.merge(feats).shape == (3, 65, model.config.hidden_dim)


def test_explicit_grid_resamples_both(config: ModelConfig) -> None:
    m = USEModel(config.model_copy(update={"grid": 6, "dino": config.dino.model_copy(update={"enabled": False}),
                                           "dino_layers": []}))
    feats = m.backbone_features(_pixels(m))
    assert set(feats) == {"clip.1", "clip.2", "clip.3"} and feats["clip.1"].shape == (2, 37, 64)
    weights, idx = _segments(6, (2, 2))
    assert m(feats, weights, idx).shape == (4, 32)


def test_resampling_keeps_geometry() -> None:
    fmap = torch.zeros(1, 4, 4)
    fmap[0, :2, :2] = 1.0  # top-left quadrant of a 4x4 patch map
    out = _to_grid(fmap.flatten(1)[..., None], 4, 8).view(8, 8)
    assert out[:3, :3].min() == 1.0 and out[5:, :].max() == 0.0 and out[:, 5:].max() == 0.0
    const = _to_grid(torch.full((2, 37 * 37, 3), 2.5), 37, 24)
    torch.testing.assert_close(const, torch.full((2, 24 * 24, 3), 2.5))


def test_dino_map_is_area_averaged_onto_the_grid() -> None:
    """DINOv2's 37x37 patch map onto CLIP's 24x24 grid: each cell the exact area average of the
    patches under it (a box filter), the kernel the segment area weights use."""
    x = torch.randn(2, 37 * 37, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = _to_grid(x, 37, 24)
    # reference: split every input patch into 24x24 sub-cells and every output cell is 37x37 of them
    up = x.view(2, 37, 37, 3).permute(0, 3, 1, 2).repeat_interleave(24, 2).repeat_interleave(24, 3)  # [2, 3, 888, 888]
    ref = F.avg_pool2d(up, 37).permute(0, 2, 3, 1).reshape(2, 24 * 24, 3)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    r = resample_matrix(37, 24, dtype=torch.float64)  # the pinned 1-D kernel
    torch.testing.assert_close(r[0, :3], torch.tensor([24 / 37, 13 / 37, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r.sum(dim=1), torch.ones(24, dtype=torch.float64))
    one = torch.zeros(1, 37 * 37, 1, dtype=torch.float64)
    one[0, 18 * 37 + 18] = 1.0  # the centre patch reaches only the output cells it overlaps
    reached = _to_grid(one, 37, 24).view(24, 24).nonzero().tolist()
    assert reached == [[11, 11], [11, 12], [12, 11], [12, 12]]


def test_pixels_and_cached_features_give_the_same_embeddings(model: USEModel) -> None:
    model.eval()
    px = _pixels(model)
    weights, idx = _segments(model.grid, (2, 3))
    feats = {k: v.half() for k, v in model.backbone_features(px).items()}  # the cache stores fp16
    a = model(px, weights, idx)
    b = model(feats, weights, idx)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))


def test_same_config_same_backbones(config: ModelConfig, model: USEModel) -> None:
    other = USEModel(config)
    px = _pixels(model)
    for k, v in model.backbone_features(px).items():
        assert torch.equal(v, other.backbone_features(px)[k]), k


def test_save_and_load_round_trip(model: USEModel, tmp_path: Path) -> None:
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init: loading must restore these
    out = model.save_pretrained(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grid"] == 8 and cfg["embed_dim"] == 32 and cfg["clip"]["tiny"]["seed"] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.trainable_state_dict()) and not any(k.startswith("backbones") for k in keys)
    loaded = USEModel.from_pretrained(out)
    model.eval()
    weights, idx = _segments(model.grid, (3, 1))
    px = _pixels(model)
    torch.testing.assert_close(loaded(px, weights, idx), model(px, weights, idx), atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode_text(["x y"]), model.encode_text(["x y"]), atol=0, rtol=0)


def test_from_pretrained_takes_a_hub_id_offline(model: USEModel, tmp_path: Path, monkeypatch) -> None:
    """``USEModel.from_pretrained("org/name")`` through huggingface_hub: with HF_HUB_OFFLINE set it reads
    the hub cache (laid out here as ``hf_hub_download`` leaves it), and a missing model is one clear error."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--use-org--use-tiny"
    model.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    loaded = USEModel.from_pretrained("use-org/use-tiny", cache_dir=tmp_path / "hub")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="use-org/absent: no such folder, and not available from the Hugging"):
        USEModel.from_pretrained("use-org/absent", cache_dir=tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        USEModel.from_pretrained(tmp_path / "no" / "such" / "dir")


def test_dino_from_a_saved_folder(config: ModelConfig, model: USEModel, tmp_path: Path) -> None:
    """The real-run path: ``Dinov2Model.from_pretrained`` on a folder gives the same features."""
    model.backbones.dino.save_pretrained(tmp_path / "dino")
    dino = config.dino.model_copy(update={"tiny": None, "path": str(tmp_path / "dino")})
    m = USEModel(config.model_copy(update={"dino": dino}))
    px = _pixels(model)
    torch.testing.assert_close(m.backbone_features(px)["dino.2"], model.backbone_features(px)["dino.2"])


def test_transform_uses_each_backbones_normalisation(model: USEModel) -> None:
    tf = pickle.loads(pickle.dumps(model.transform))  # ok: our own object; it must pickle to reach DataLoader workers
    out = tf(Image.new("RGB", (90, 30), (128, 128, 128)))
    assert out["clip"].shape == (3, 64, 64) and out["dino"].shape == (3, 56, 56)
    v = 128 / 255
    expect_clip = (v - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    expect_dino = (v - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["clip"][:, 10, 10], expect_clip)
    torch.testing.assert_close(out["dino"][:, 10, 10], expect_dino)
    assert not torch.allclose(expect_clip, expect_dino)
    assert isinstance(ImageTransform(model.config)(Image.new("L", (5, 5)))["clip"], torch.Tensor)


def test_encode_text_dedups_and_normalises(model: USEModel) -> None:
    t = model.encode_text(["red circle", "blue square", "red circle"])
    assert t.shape == (3, 32) and t.dtype == torch.float32
    assert torch.equal(t[0], t[2]) and not torch.allclose(t[0], t[1])
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("use_cls", [True, False])
def test_loss_decreases_on_a_toy_problem(config: ModelConfig, use_cls: bool) -> None:
    """Segments of 4 images, each labelled by which quadrant it covers: learnable from patches."""
    torch.manual_seed(0)
    m = USEModel(config.model_copy(update={"use_cls": use_cls}))
    assert m.head.in_features == m.config.hidden_dim * (2 if use_cls else 1)
    px = _pixels(m, 4)
    feats = m.backbone_features(px)
    names = ["top left", "top right", "bottom left", "bottom right"]
    masks = torch.zeros(16, 32, 32, dtype=torch.bool)
    for b in range(4):
        for q in range(4):
            r, c = divmod(q, 2)
            masks[4 * b + q, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = True
    weights, idx = area_weights(masks, m.grid), torch.arange(4).repeat_interleave(4)
    txt = m.encode_text([names[q] for _ in range(4) for q in range(4)])
    loss_fn = SegmentTextLoss()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = loss_fn(m(feats, weights, idx), txt, m.logit_scale_exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_configs_resolve_without_weights() -> None:
    real = ModelConfig.from_yaml(TINY.parent / "model-vitl14.yaml").resolved()
    assert (real.grid, real.embed_dim, real.clip_image_size, real.dino_image_size) == (24, 768, 336, 518)
    tf = ImageTransform(real)
    assert (tf.clip_size, tf.dino_size) == (336, 518)
    assert ModelConfig.from_dict(real.to_dict()) == real
    with pytest.raises(ValueError, match="exactly one"):
        ModelConfig.from_dict({"clip": {}})
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"clip_layers": [0]})


def test_embeddings_follow_the_method(config: ModelConfig) -> None:
    """The model's output against the method written out by hand, segment by segment: per level
    LayerNorm then Linear (LLN), times that level's patch scale, summed; each segment's area-weighted
    patch average (a loop) next to its image's cls token; the linear head; L2 normalisation."""
    m = USEModel(config)
    with torch.no_grad():  # away from the init so that a mixed-up scale or a skipped norm shows
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    m.eval()
    feats = m.backbone_features(_pixels(m, 3))
    weights, idx = _segments(m.grid, (2, 0, 3))
    merged = 0
    for i, key in enumerate(m.level_keys):
        lln = m.lln[key.replace(".", "_")]
        normed = F.layer_norm(feats[key], (feats[key].shape[-1],), lln.norm.weight, lln.norm.bias, lln.norm.eps)
        merged = merged + m.patch_scales[i] * (normed @ lln.proj.weight.T + lln.proj.bias)
    ref = []
    for s in range(weights.shape[0]):
        b = int(idx[s])
        pooled = sum(weights[s, q] * merged[b, 1 + q] for q in range(m.grid * m.grid))
        z = torch.cat([pooled, merged[b, 0]]) @ m.head.weight.T + m.head.bias
        ref.append(z / z.norm())
    torch.testing.assert_close(m(feats, weights, idx), torch.stack(ref), atol=1e-5, rtol=1e-4)


def test_levels_are_block_outputs_before_the_final_norm(model: USEModel) -> None:
    """``clip.k`` / ``dino.k`` are the outputs of block k (1-based), run here block by block, and
    the last level is taken before the final norm: that norm applied to it gives the towers' own
    outputs (CLIP's image embedding through ln_post + proj, DINOv2's last_hidden_state)."""
    px = _pixels(model)
    feats = model.backbone_features(px)
    visual, dino = model.backbones.clip.visual, model.backbones.dino
    with torch.no_grad():
        x = visual._embeds(px["clip"])
        assert visual.transformer.batch_first
        for k, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if k in model.config.clip_layers:
                torch.testing.assert_close(feats[f"clip.{k}"], x)  # CLIP's grid is the common grid
        last = feats[f"clip.{len(visual.transformer.resblocks)}"]
        torch.testing.assert_close(visual.ln_post(last[:, 0]) @ visual.proj, model.backbones.clip.encode_image(px["clip"]))

        h = dino.embeddings(px["dino"])
        side = px["dino"].shape[-1] // dino.config.patch_size
        for k, layer in enumerate(dino.encoder.layer, start=1):
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
            if k in model.config.dino_layers:
                torch.testing.assert_close(feats[f"dino.{k}"][:, 0], h[:, 0])
                torch.testing.assert_close(feats[f"dino.{k}"][:, 1:], _to_grid(h[:, 1:], side, model.grid))
        last = feats[f"dino.{dino.config.num_hidden_layers}"][:, 0]
        torch.testing.assert_close(dino.layernorm(last), dino(pixel_values=px["dino"]).last_hidden_state[:, 0])
