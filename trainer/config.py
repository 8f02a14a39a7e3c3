"""The trainer's configuration: one pydantic model, read from YAML, patched by ``key=value`` overrides
(:mod:`shards.overrides`, the parser the pipeline uses too).

Every value has a documented default so that a config file only says what differs from them. The
model is described by its own YAML (``trainer/configs/model-*.yaml``, read by
``trainer.model.ModelConfig``); the training config names it by path, or inlines it as a mapping.
Unknown keys are errors (``extra="forbid"``): a misspelt override must not be silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shards import overrides as overrides_lib

from .errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """How shards become batches (see ``trainer/data.py``)."""

    batch_size: int = Field(32, ge=1, description="images per rank per step (segments vary per image)")
    workers: int = Field(4, ge=0, description="DataLoader worker processes per rank (0 = in the main process)")
    shuffle_buffer: int = Field(1000, ge=0, description="sample shuffle buffer per worker; 0 keeps file order")
    shard_shuffle: bool = Field(True, description="shuffle the shard list each epoch (same order on all ranks)")
    resampled: bool = Field(False, description="draw shards with replacement (open_clip --dataset-resampled)")
    samples_per_epoch: int | None = Field(
        None, ge=1, description="images per epoch over all ranks; default: the sum of the shard stats files")
    max_segments_per_image: int = Field(32, ge=1, description="segments kept per image, a random choice beyond this")
    min_segment_area: int = Field(1, ge=0, description="segments with a smaller pixel area are dropped")
    seed: int | None = Field(None, description="seed of the data order and text draws; default: the top-level seed")


class OptimConfig(_Strict):
    """AdamW with linear warmup and cosine decay, as open_clip trains CLIP."""

    lr: float = Field(5e-4, gt=0, description="peak learning rate, reached after warmup")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine")
    weight_decay: float = Field(0.05, ge=0, description="on weight matrices only (not norms, biases, scales, temperature)")
    warmup_steps: int = Field(500, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = Field(1.0, description="max global gradient norm; null disables clipping")


class TrainConfig(_Strict):
    """Everything ``python -m trainer train`` needs besides ``--shards`` and ``--output``."""

    model: str | dict[str, Any] = Field(
        "model-tiny.yaml", description="model YAML path (relative to cwd or to this config's folder) or inline mapping")
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    steps: int | None = Field(None, ge=1, description="optimizer steps in all; exclusive with epochs")
    epochs: int | None = Field(None, ge=1, description="passes over samples_per_epoch; exclusive with steps")
    stop_at: int | None = Field(
        None, ge=1, description="leave after this step with a checkpoint (time-limited jobs); --resume goes on")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    log_every: int = Field(10, ge=1, description="steps between TensorBoard scalars and log lines")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    use_feature_cache: bool = Field(False, description="read backbone features from `cache-features` output")
    cache_dir: str | None = Field(None, description="where the feature cache lives; default: beside the shards")
    cache_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="dtype `cache-features` writes: bf16 (half the disk, what bf16 autocast computes, no "
                            "overflow), fp16 (finer, overflows past 65504: checked at write), fp32 (= image training)")
    log_keys: bool = Field(False, description="append each step's sample keys to OUTPUT/keys/rank{R}.txt (sharding audits)")
    find_unused_parameters: bool = Field(False, description="DDP option, for model variants that skip a trainable part")
    seed: int = Field(0, description="seed of model init, torch/numpy/python RNGs and (by default) the data")
    config_dir: str | None = Field(None, exclude=True, description="set by from_yaml to resolve relative paths")

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            raise ValueError("give the training length: steps=N or epochs=N")
        return self

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    def model_source(self) -> str | dict[str, Any]:
        """The model YAML as an existing path (cwd first, then the config's folder), or the inline mapping."""
        if isinstance(self.model, dict):
            return self.model
        p = Path(self.model)
        if not p.is_absolute() and not p.exists() and self.config_dir is not None:
            p = Path(self.config_dir) / p
        if not p.exists():
            raise InputError(f"model config {self.model!r} not found (cwd or {self.config_dir})")
        return str(p)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file (``yaml.safe_load``), apply ``key=value`` overrides, validate."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise InputError(f"--config {path}: no such file") from e
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"--config {path}: not readable YAML ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        if not isinstance(raw, dict):
            raise InputError(f"{path}: a training config must be a mapping")
        try:  # the project's one override parser: unknown keys named with where they came from and a suggestion
            overrides_lib.check_keys({k: v for k, v in raw.items() if k != "model"}, cls, f"in {path}")
            raw = overrides_lib.apply(raw, overrides or [], model=cls)
        except overrides_lib.OverrideError as e:
            raise InputError(str(e)) from e
        keys = {o.split("=", 1)[0].strip() for o in overrides or []}
        for a, b in (("steps", "epochs"), ("epochs", "steps")):
            if a in keys and b not in keys:
                raw.pop(b, None)  # `steps=N` on the command line replaces the file's `epochs`, and back
        raw["config_dir"] = str(Path(path).resolve().parent)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:  # one line: "where: what" for each problem
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
                                 for err in e.errors())
            raise InputError(f"{path}: {problems}") from e

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
