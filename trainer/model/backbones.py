"""Frozen CLIP (open_clip) and DINOv2 (transformers) backbones.

Both are built from :class:`~trainer.model.config.ModelConfig`: real runs name weights (an open_clip
model name + tag or local file, a DINOv2 hub id or local folder); tests and the demo build tiny
random models from configs with a fixed seed, so the same config always gives the same weights
(init runs on the CPU generator inside ``fork_rng``, leaving the caller's RNG untouched).

They never train: parameters have ``requires_grad=False``, :meth:`FrozenBackbones.train` keeps them
in eval mode whatever the parent asks, and features are computed under ``torch.no_grad``.

Features: for each configured layer, the patch tokens are reshaped to their own patch map, resampled
onto the common ``grid x grid`` (exact area averages: both grids tile the same image; skipped when
the sizes already match, see :func:`_to_grid`) and flattened
row-major; the layer's cls token is kept at index 0. Output: ``{"clip.8": [B, 1 + G*G, C], ...}``.
Taken before any final norm: the trainable LLN normalises each level itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .area_weights import resample_matrix
from .config import ModelConfig


def _build_clip(cfg: ModelConfig) -> tuple[nn.Module, object]:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    if cfg.clip.tiny is not None:
        t = cfg.clip.tiny
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            model = open_clip.CLIP(
                embed_dim=t.embed_dim,
                vision_cfg=CLIPVisionCfg(layers=t.vision_layers, width=t.vision_width,
                                         head_width=t.vision_head_width, patch_size=t.patch_size,
                                         image_size=t.image_size),
                text_cfg=CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size,
                                     width=t.text_width, heads=t.text_heads, layers=t.text_layers),
            )
        return model, SimpleTokenizer(context_length=t.context_length)
    p = cfg.clip.pretrained
    p.register()
    kwargs = {}
    if cfg.clip_image_size is not None:
        kwargs["force_image_size"] = cfg.clip_image_size
    model = open_clip.create_model(p.model_name, pretrained=p.pretrained, **kwargs)
    return model, open_clip.get_tokenizer(p.model_name)


def _build_dino(cfg: ModelConfig) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    d = cfg.dino
    if d.tiny is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(d.seed)
            return Dinov2Model(Dinov2Config(**d.tiny))
    return Dinov2Model.from_pretrained(d.path, dtype=torch.float32)


def _to_grid(tokens: torch.Tensor, side: int, grid: int) -> torch.Tensor:
    """Patch tokens ``[B, side*side, C]`` -> ``[B, grid*grid, C]``, exact area averages.

    Each output cell is the average of the input patches under it, weighted by overlap area
    (:func:`~trainer.model.area_weights.resample_matrix`, the overlaps the segment area weights use),
    so DINOv2's 37x37 map lands on CLIP's 24x24 grid as a box filter of the right width, as the
    area weights on that grid assume. (Antialiased bilinear would be a triangle filter reaching into
    neighbouring cells.) Going up (tests' 4x4 onto 8x8) each input patch's value fills the cells it covers.
    """
    if side == grid:
        return tokens
    b, _, c = tokens.shape
    r = resample_matrix(side, grid, tokens.device, tokens.dtype)
    fmap = tokens.reshape(b, side, side, c)
    out = torch.einsum("ir,brsc,js->bijc", r, fmap, r)
    return out.reshape(b, grid * grid, c)


class FrozenBackbones(nn.Module):
    """CLIP vision + text towers and (optionally) DINOv2, frozen. ``config`` must be resolved."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.is_resolved:
            raise ValueError("FrozenBackbones needs a resolved ModelConfig (config.resolved())")
        self.clip, self.tokenizer = _build_clip(config)
        self.dino = _build_dino(config) if config.dino.enabled else None
        if self.dino is not None and int(self.dino.config.patch_size) != config.dino_patch_size:
            raise ValueError(f"dino_patch_size {config.dino_patch_size} but the DINOv2 model's patch is "
                             f"{self.dino.config.patch_size}")
        self.config = config
        self.grid = int(config.grid)
        self.clip_layers = sorted(set(config.clip_layers))
        self.dino_layers = sorted(set(config.dino_layers)) if self.dino is not None else []
        n_clip = len(self.clip.visual.transformer.resblocks)
        if self.clip_layers[-1] > n_clip:
            raise ValueError(f"clip_layers {self.clip_layers} exceed the {n_clip} CLIP blocks")
        if self.dino is not None and self.dino_layers[-1] > self.dino.config.num_hidden_layers:
            raise ValueError(f"dino_layers {self.dino_layers} exceed the "
                             f"{self.dino.config.num_hidden_layers} DINOv2 blocks")
        clip_patch = int(self.clip.visual.patch_size[0])
        if config.clip_image_size % clip_patch:
            raise ValueError(f"clip_image_size {config.clip_image_size} is not a multiple of the patch {clip_patch}")
        if self.dino is not None and config.dino_image_size % config.dino_patch_size:
            raise ValueError(f"dino_image_size {config.dino_image_size} is not a multiple of the patch "
                             f"{config.dino_patch_size}: the patch grid would not tile the image")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBackbones:  # frozen: always eval, whatever `mode`
        return super().train(False)

    def level_dims(self) -> dict[str, int]:
        """Feature key -> channel dim, in the order :meth:`forward` returns them."""
        dims = {f"clip.{k}": int(self.clip.visual.transformer.width) for k in self.clip_layers}
        if self.dino is not None:
            dims.update({f"dino.{k}": int(self.dino.config.hidden_size) for k in self.dino_layers})
        return dims

    @torch.no_grad()
    def forward(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = pixels["clip"]
        side = x.shape[-1] // self.clip.visual.patch_size[1]
        res = self.clip.visual.forward_intermediates(
            x, indices=[k - 1 for k in self.clip_layers], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        for k, patches, cls in zip(self.clip_layers, res["image_intermediates"],
                                   res["image_intermediates_prefix"], strict=True):
            out[f"clip.{k}"] = torch.cat([cls, _to_grid(patches, side, self.grid)], dim=1)
        if self.dino is not None:
            x = pixels["dino"]
            side = x.shape[-1] // int(self.dino.config.patch_size)
            hidden = self.dino(pixel_values=x, output_hidden_states=True).hidden_states
            for k in self.dino_layers:
                h = hidden[k]  # hidden[0] is the embedding output, hidden[k] block k's output
                out[f"dino.{k}"] = torch.cat([h[:, :1], _to_grid(h[:, 1:], side, self.grid)], dim=1)
        return out

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``[T, embed_dim]`` L2-normalised; each distinct text is encoded once per call."""
        device = next(self.clip.parameters()).device
        if len(texts) == 0:
            return torch.zeros(0, int(self.config.embed_dim), device=device)
        unique = list(dict.fromkeys(texts))
        index = {t: i for i, t in enumerate(unique)}
        tokens = self.tokenizer(unique).to(device)
        emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)  # fp32 even under autocast
        return emb[torch.tensor([index[t] for t in texts], device=device)]
