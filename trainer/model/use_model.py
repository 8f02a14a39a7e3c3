"""The USE segment embedding model: frozen backbones, trainable multi-level merge and segment head.

Merge (paper: "multi-level feature merging", LLN + patch scales): every configured level ``l``
(``clip.k`` / ``dino.k``, already on the common grid) goes through its own LLN -- ``LayerNorm`` then a
learnable ``Linear(C_l, hidden_dim)`` -- and is multiplied by a trainable scalar patch scale
``a_l``; the levels are summed: ``merged = sum_l a_l * LLN_l(f_l)``, ``[B, 1 + G*G, hidden]`` with
the merged cls token at index 0. Patch scales start at ``1 / n_levels`` (an average of the
levels); a scalar per level is our reading of "patch scale parameters" (*open* in the paper).

Segment head: ``pooled_s = sum_p w[s, p] * merged[b(s), 1 + p]`` with ``w`` the area weights
(:mod:`trainer.model.area_weights`), computed for all segments of the batch at once over the
non-zero weights only (one ``embedding_bag``, see :func:`pool_segments`; no loop over segments,
no ``[S, G*G, hidden]`` copy). With
``use_cls`` the image's merged cls token is *concatenated* to ``pooled_s`` before the linear head
(``Linear(2 * hidden, embed_dim)``), so the head learns per dimension how much global context to
mix in; adding it instead would force the same map on both (the paper only says the global feature
is included and helps). Output: L2-normalised ``[S, embed_dim]`` in CLIP's joint space.

Trainable: LLNs, patch scales, head, ``logit_scale``. ``save_pretrained`` writes ``config.json`` and
``model.safetensors`` with only those; the backbones are rebuilt from the config on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..files import atomic_write_text, save_safetensors
from .backbones import FrozenBackbones
from .config import ModelConfig
from .segments import Masks, segment_inputs
from .transforms import ImageTransform

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_LOGIT_SCALE = 100.0  # as CLIP: the temperature is clamped at 1/100


class LLN(nn.Module):
    """Linear layer normalisation: ``Linear(LayerNorm(x))``, both learnable."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def named_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The one definition of "trainable parameters": those with ``requires_grad``.

    :class:`FrozenBackbones` turns it off for every backbone weight, so for :class:`USEModel` these
    are the LLNs, patch scales, head and ``logit_scale``. The optimizer, checkpoints, DDP's ignore
    list and ``save_pretrained`` all ask this function.
    """
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def pool_segments(tokens: torch.Tensor, weights: torch.Tensor, image_index: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Area-weighted patch average for every segment: ``[B, T, D]``, ``[S, P]``, ``[S]`` -> ``[S, D]``.

    Patch ``p`` of image ``b`` is ``tokens[b, first + p]`` (``first=1`` skips a leading cls token without
    copying the patch map out of ``tokens``). Area weights are sparse: a segment touches a few dozen of
    the grid's hundreds of patches (its bounding box), so the sum runs over the non-zero weights only,
    as one ``F.embedding_bag`` (``mode="sum"``, ``per_sample_weights``) over the batch's token rows:
    a row is read once per segment that covers it, and no ``[S, P]`` x ``[P, D]`` product pays for
    the zeros. A dense padded ``bmm`` costs ``P / nnz`` times the arithmetic and, in training, the
    same factor in the backward; ``benchmarks/bench_pool.py`` times both against a per-segment loop.
    Rows of empty masks come out as zeros (empty bags). Differentiable in ``tokens``.
    """
    b, t, d = tokens.shape
    s, p = weights.shape
    if first + p > t:
        raise ValueError(f"{p} patch weights from token {first} do not fit {t} tokens per image")
    if s == 0:
        return tokens.new_zeros(0, d)
    image_index = image_index.to(device=tokens.device, dtype=torch.long)
    weights = weights.to(device=tokens.device, dtype=tokens.dtype)
    seg, patch = weights.nonzero(as_tuple=True)  # row-major: grouped by segment, in order
    offsets = torch.searchsorted(seg, torch.arange(s, device=tokens.device))
    rows = image_index[seg] * t + first + patch
    return F.embedding_bag(rows, tokens.reshape(b * t, d), offsets, mode="sum", per_sample_weights=weights[seg, patch])


class USEModel(nn.Module):
    """Universal segment embeddings on frozen CLIP + DINOv2 features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.backbones = FrozenBackbones(config.resolved())
        self.config: ModelConfig = self.backbones.config
        self.grid: int = self.backbones.grid
        self.transform = ImageTransform(self.config)
        dims = self.backbones.level_dims()
        self.level_keys: list[str] = list(dims)
        hidden = self.config.hidden_dim
        self.lln = nn.ModuleDict({k.replace(".", "_"): LLN(c, hidden) for k, c in dims.items()})
        self.patch_scales = nn.Parameter(torch.full((len(dims),), 1.0 / len(dims)))
        self.head = nn.Linear(hidden * (2 if self.config.use_cls else 1), int(self.config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(self.config.init_logit_scale)))

    # --- features -------------------------------------------------------------------------------
    @torch.no_grad()
    def backbone_features(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Frozen multi-level features ``{key: [B, 1 + G*G, C]}`` (what the feature cache stores)."""
        return self.backbones(pixels)

    def merge(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_l a_l * LLN_l(f_l)`` -> ``[B, 1 + G*G, hidden]`` (cls at 0). Accepts fp16 cached features."""
        dtype = self.head.weight.dtype
        merged = None
        for i, key in enumerate(self.level_keys):
            y = self.lln[key.replace(".", "_")](features[key].to(dtype)) * self.patch_scales[i]
            merged = y if merged is None else merged + y
        return merged

    def segment_embeddings(self, features: dict[str, torch.Tensor], area_weights: torch.Tensor,
                           image_index: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``[S, embed_dim]``; ``area_weights [S, G*G]``, ``image_index [S]`` into the batch."""
        merged = self.merge(features)
        pooled = pool_segments(merged, area_weights, image_index, first=1)
        if self.config.use_cls:
            cls = merged[:, 0][image_index.to(device=merged.device, dtype=torch.long)]
            pooled = torch.cat([pooled, cls], dim=-1)
        return F.normalize(self.head(pooled), dim=-1)

    def forward(self, pixels_or_features: dict[str, torch.Tensor], area_weights: torch.Tensor,
                image_index: torch.Tensor, return_logit_scale: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segment embeddings from pixels (``{"clip", "dino"}``) or from backbone features.

        Under DDP call the wrapped model (this ``forward``), not ``segment_embeddings`` on
        ``.module``, so gradient synchronisation hooks run. ``return_logit_scale`` also returns
        :meth:`logit_scale_exp`, as open_clip's CLIP does.
        """
        features = pixels_or_features
        if set(features) <= {"clip", "dino"}:
            features = self.backbone_features(features)
        emb = self.segment_embeddings(features, area_weights, image_index)
        return (emb, self.logit_scale_exp()) if return_logit_scale else emb

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def embed_masks(self, image: Image.Image, masks: Masks) -> torch.Tensor:
        """Embeddings ``[S, embed_dim]`` (float32, L2-normalised, on the model's device) of the
        segments of ``image`` given as boolean masks ``[S, H, W]`` (numpy or torch) or COCO RLEs.

        The same inputs the trainer builds from a shard sample (:mod:`trainer.model.segments`), so a
        segment gets the embedding it was trained towards. Rows of empty masks are all zeros.
        """
        return self.embed_masks_batch([image], [masks])[0]

    @torch.no_grad()
    def embed_masks_batch(self, images: Sequence[Image.Image], masks: Sequence[Masks],
                          batch_size: int = 16) -> list[torch.Tensor]:
        """:meth:`embed_masks` for several images, ``batch_size`` images per backbone forward."""
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} mask sets")
        out: list[torch.Tensor] = []
        dim, device = int(self.config.embed_dim), self.device
        for start in range(0, len(images), batch_size):
            items = [segment_inputs(im.convert("RGB"), m, transform=self.transform, grid=self.grid)
                     for im, m in zip(images[start:start + batch_size], masks[start:start + batch_size], strict=True)]
            pixels = {k: torch.stack([it.pixels[k] for it in items]).to(device) for k in items[0].pixels}
            weights = torch.cat([it.weights[it.valid] for it in items]).to(device)
            index = torch.cat([torch.full((int(it.valid.sum()),), i, dtype=torch.long) for i, it in enumerate(items)])
            emb = self.segment_embeddings(self.backbone_features(pixels), weights, index.to(device)).float()
            pos = 0
            for it in items:
                full = torch.zeros(it.valid.shape[0], dim, device=device)
                n = int(it.valid.sum())
                full[it.valid.to(device)] = emb[pos:pos + n]
                pos += n
                out.append(full)
        return out

    def logit_scale_exp(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at 100 (gradient stops above the clamp, like CLIP's clamp)."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Frozen CLIP text embeddings ``[T, embed_dim]``, L2-normalised."""
        return self.backbones.encode_text(texts)

    # --- parameters and io ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> USEModel:
        super().train(mode)
        self.backbones.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in named_trainable(self)]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return named_trainable(self)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only (what ``model.safetensors`` and checkpoints hold)."""
        return {n: p.detach() for n, p in named_trainable(self)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load trainable weights strictly: every key must exist and none may be missing."""
        own = self.trainable_state_dict()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            raise KeyError(f"trainable weights mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}")
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (trainable weights), written atomically with umask permissions."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_safetensors(self.trainable_state_dict(), out / WEIGHTS_NAME, metadata={"format": "pt"})
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | Path | None = None) -> USEModel:
        """Rebuild from ``config.json`` (backbones from their named weights) and load the safetensors.

        ``name_or_path`` is a local folder (``save_pretrained``'s output, e.g. a run's ``final/``) or a
        Hugging Face Hub model id (``org/name``), fetched with ``huggingface_hub.hf_hub_download``:
        from the local cache when ``HF_HUB_OFFLINE=1`` is set, downloading otherwise.
        """
        src = Path(name_or_path)
        if src.is_dir():
            config_file, weights_file = src / CONFIG_NAME, src / WEIGHTS_NAME
        elif src.exists() or str(name_or_path).count("/") > 1 or str(name_or_path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name_or_path}: not a model folder (config.json + model.safetensors)")
        else:
            try:
                config_file, weights_file = (Path(hf_hub_download(str(name_or_path), f, revision=revision,
                                                                  cache_dir=cache_dir))
                                             for f in (CONFIG_NAME, WEIGHTS_NAME))
            except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError) as e:
                raise FileNotFoundError(f"{name_or_path}: no such folder, and not available from the Hugging Face "
                                        f"Hub ({type(e).__name__}; offline: {constants.HF_HUB_OFFLINE})") from e
        config = ModelConfig.from_dict(json.loads(config_file.read_text()))
        model = cls(config)
        model.load_trainable_state_dict(load_file(str(weights_file), device=str(map_location)))
        return model.to(map_location)
