"""Configuration of the USE segment embedding model.

One pydantic model names everything needed to rebuild the network: the frozen backbones (by
open_clip model name + pretrained tag/file, by transformers hub id/local folder, or as tiny
random-initialised configs with a fixed seed for tests and the demo), which transformer blocks feed
the multi-level merge, the common patch grid, and the trainable head's sizes. ``config.json`` of a
saved model is ``ModelConfig.to_dict()`` after :meth:`ModelConfig.resolved`, so every derived value
(grid, image sizes, joint-space dim) is written out explicitly.

Layer numbering (the paper does not say which layers; *open*, hence config): layer ``k`` is the
output of the ``k``-th transformer block, 1-based, so ``24`` is the last block of a ViT-L. This is
DINOv2's ``hidden_states[k]`` and open_clip's ``forward_intermediates`` index ``k - 1``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

_BACKBONE_FIELDS = ("clip", "clip_layers", "dino", "dino_layers", "grid", "clip_image_size", "dino_image_size",
                    "dino_patch_size")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PretrainedClip(_Strict):
    """A real open_clip model, built by ``open_clip.create_model(model_name, pretrained=...)``.

    ``pretrained`` is a tag (``openai``) or a local checkpoint file (``.safetensors``/``.bin``/``.pt``).
    ``config_file`` optionally names an open_clip model config JSON (``{"embed_dim", "vision_cfg",
    "text_cfg"}``) to register first (``open_clip.add_model_config``) for architectures open_clip
    does not ship; ``model_name`` must then be its file stem, which is how open_clip names it.
    """

    model_name: str = "ViT-L-14-336-quickgelu"
    pretrained: str = "openai"
    config_file: str | None = None

    @model_validator(mode="after")
    def _name_matches_config(self) -> PretrainedClip:
        if self.config_file is not None and Path(self.config_file).stem != self.model_name:
            raise ValueError(f"clip.pretrained.config_file {self.config_file!r}: open_clip names it "
                             f"{Path(self.config_file).stem!r}, not model_name {self.model_name!r}")
        return self

    def register(self) -> None:
        """Make ``model_name`` known to open_clip (a no-op for the models it ships)."""
        if self.config_file is not None:
            import open_clip

            if not Path(self.config_file).is_file():
                raise FileNotFoundError(f"clip.pretrained.config_file {self.config_file} not found")
            open_clip.add_model_config(self.config_file)


class TinyClip(_Strict):
    """A small randomly initialised ``open_clip.CLIP`` (tests/demo); same seed -> same weights."""

    embed_dim: int = 32
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 32
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 16
    vocab_size: int = 49408  # the open_clip BPE vocabulary, so the real tokenizer works offline
    seed: int = 0


class ClipBackboneConfig(_Strict):
    """Exactly one of ``pretrained`` / ``tiny``."""

    pretrained: PretrainedClip | None = None
    tiny: TinyClip | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ClipBackboneConfig:
        if (self.pretrained is None) == (self.tiny is None):
            raise ValueError("clip: set exactly one of 'pretrained' or 'tiny'")
        return self


class DinoBackboneConfig(_Strict):
    """DINOv2 through ``transformers.Dinov2Model``.

    ``path`` is a hub id or a local folder for ``from_pretrained``; ``tiny`` is a dict of
    ``Dinov2Config`` keyword arguments for a random model built with ``seed`` (takes precedence
    over ``path``). ``enabled: false`` drops DINOv2 (the CLIP-only ablation).
    """

    enabled: bool = True
    path: str | None = "facebook/dinov2-large"
    tiny: dict[str, Any] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _has_source(self) -> DinoBackboneConfig:
        if self.enabled and self.path is None and self.tiny is None:
            raise ValueError("dino: enabled but neither 'path' nor 'tiny' is set")
        return self


class ModelConfig(_Strict):
    """Everything that defines a USE model. ``None`` fields are derived by :meth:`resolved`."""

    clip: ClipBackboneConfig = Field(default_factory=lambda: ClipBackboneConfig(pretrained=PretrainedClip()))
    clip_layers: list[int] = Field(default_factory=lambda: [8, 16, 24], description="1-based CLIP blocks")
    dino: DinoBackboneConfig = Field(default_factory=DinoBackboneConfig)
    dino_layers: list[int] = Field(default_factory=lambda: [8, 16, 24], description="1-based DINOv2 blocks")
    grid: int | None = Field(None, description="common patch grid side; default: CLIP's grid")
    clip_image_size: int | None = Field(None, description="CLIP input side; default: the model's own")
    dino_image_size: int = Field(518, description="DINOv2 input side (518 -> 37x37 patches at /14)")
    dino_patch_size: int | None = Field(None, description="DINOv2 patch size; default: from its config")
    use_cls: bool = Field(True, description="include the cls token as the global image feature")
    hidden_dim: int = Field(1024, description="merged patch feature dim (LLN output)")
    embed_dim: int | None = Field(None, description="CLIP joint-space dim; taken from the CLIP model")
    init_logit_scale: float = Field(math.log(1 / 0.07), description="log of the initial inverse temperature")

    @model_validator(mode="after")
    def _check_layers(self) -> ModelConfig:
        if not self.clip_layers:
            raise ValueError("clip_layers must name at least one block")
        if any(k < 1 for k in self.clip_layers + self.dino_layers):
            raise ValueError("layers are 1-based block numbers (>= 1)")
        if self.dino.enabled and not self.dino_layers:
            raise ValueError("dino enabled but dino_layers is empty")
        return self

    # --- derived values -------------------------------------------------------------------------
    def _clip_vision(self) -> tuple[int, int, int]:
        """(image_size, patch_size, embed_dim) of the CLIP model, read without building it."""
        if self.clip.tiny is not None:
            t = self.clip.tiny
            return t.image_size, t.patch_size, t.embed_dim
        import open_clip

        self.clip.pretrained.register()
        cfg = open_clip.get_model_config(self.clip.pretrained.model_name)
        if cfg is None:
            if self.clip_image_size is None or self.embed_dim is None or self.grid is None:
                raise ValueError(f"unknown open_clip model {self.clip.pretrained.model_name!r}: "
                                 "set clip_image_size, grid and embed_dim explicitly")
            return self.clip_image_size, self.clip_image_size // self.grid, self.embed_dim
        vc = cfg["vision_cfg"]
        size = vc["image_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size), int(vc["patch_size"]), int(cfg["embed_dim"])

    def _dino_patch_size(self) -> int | None:
        """DINOv2's patch size from its tiny config or its ``config.json`` (no weights are read)."""
        if not self.dino.enabled:
            return None
        if self.dino.tiny is not None:
            return int(self.dino.tiny.get("patch_size", 14))
        from transformers import Dinov2Config

        return int(Dinov2Config.from_pretrained(self.dino.path).patch_size)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.grid, self.clip_image_size, self.embed_dim) and (
            not self.dino.enabled or self.dino_patch_size is not None)

    def resolved(self) -> ModelConfig:
        """A copy with ``clip_image_size``, ``grid``, ``embed_dim`` and ``dino_patch_size`` filled in.

        Done once, where a model is built (:class:`~trainer.model.USEModel` and the trainer's runtime);
        everything below takes the resolved config as it is. Idempotent.
        """
        if self.is_resolved:
            return self
        size, patch, embed = self._clip_vision()
        clip_size = self.clip_image_size or size
        update = {
            "clip_image_size": clip_size,
            "grid": self.grid or clip_size // patch,
            "embed_dim": self.embed_dim or embed,
            "dino_patch_size": self.dino_patch_size or self._dino_patch_size(),
        }
        return self.model_copy(update=update)

    def backbone_fingerprint(self) -> str:
        """A short hash of the fields that decide the frozen backbone features (not the trainable head).

        The feature cache is valid for a model exactly when the fingerprints agree.
        """
        d = self.resolved().to_dict()
        relevant = {k: d.get(k) for k in _BACKBONE_FIELDS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    # --- io -------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Load a YAML file; a top-level ``model:`` key is accepted so one file can hold all configs."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.model_validate(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
