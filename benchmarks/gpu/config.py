"""Settings of the GPU suite: which models, batch sizes, time budgets, precision, compile.

Loaded from YAML (``configs/full.yaml`` by default, ``configs/tiny.yaml`` with ``--tiny``); every
field has a documented default. ``size`` picks the architectures (:mod:`benchmarks.gpu.arch`):
``full`` the real ones, ``tiny`` a few-layer version of each for the CPU test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIGS = Path(__file__).resolve().parent / "configs"

#: Referring expressions of the kind the phrase stage makes from three LLaVA answers about one COCO
#: image; the grounder packs them into prompts under its text-token limit.
DEFAULT_PHRASES = [
    "a man", "a man in a red shirt", "a brown horse", "a wooden fence", "the green grass", "a blue sky",
    "white clouds", "a woman holding an umbrella", "a black umbrella", "the wheels of a bicycle",
    "a red bicycle", "a dog on a leash", "the leash", "a tall tree", "the trunk of the tree", "a street lamp",
    "a parked car", "the front of the car", "a silver car with tinted windows", "a stop sign",
    "a brick building", "the windows of the building", "a wooden bench", "a trash can", "a small child",
    "the child's yellow jacket", "a backpack", "the sidewalk", "a crosswalk", "a traffic light",
    "the head of the horse", "the saddle", "the rider's helmet", "a white van", "a fire hydrant",
    "the roof of the house", "a chimney", "a person walking", "a shadow on the ground", "a mountain in the distance",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelBench(_Strict):
    """Common per-model settings."""

    enabled: bool = True
    budget_s: float = Field(90.0, gt=0, description="wall-clock budget of this model's child process")
    batch_sizes: list[int] = Field(default_factory=lambda: [1], description="batch sizes of the main measurement")
    compile: bool = Field(True, description="also measure under torch.compile (largest batch that ran eagerly)")
    iters: int | None = Field(None, ge=1, description="timed calls per measurement; null: the suite's iters")
    arch: dict[str, Any] = Field(default_factory=dict, description="overrides of the architecture config")


class SamBench(ModelBench):
    """SAM: image encoder at ``batch_sizes``; box decoder with ``boxes_per_image`` boxes; AMG on one image."""

    boxes_per_image: int = Field(32, ge=1, description="box prompts per image (the segmenter's boxes_per_batch)")
    image_hw: tuple[int, int] = Field((480, 640), description="original image size (COCO-like)")
    amg: bool = True
    amg_points_per_side: int = Field(32, ge=1)


class GroundingBench(ModelBench):
    """Grounding DINO: (image, prompt chunk) pairs per forward; the phrase set decides chunks per image."""

    variant: Literal["swin-t", "swin-b"] = "swin-t"
    image_hw: tuple[int, int] = Field((800, 1066), description="model input size (640x480 at shortest edge 800)")
    phrases: list[str] = Field(default_factory=lambda: list(DEFAULT_PHRASES))
    tokens_per_word: float = Field(1.3, gt=0, description="BERT word pieces per word, to size the prompts")


class LlavaBench(ModelBench):
    """LLaVA-1.5: greedy generation of exactly ``new_tokens`` tokens per (image, prompt) sequence."""

    new_tokens: int = Field(128, ge=1)
    prompt_tokens: int = Field(40, ge=1, description="text tokens of the prompt around the image tokens")
    prompts_per_image: int = Field(3, ge=1, description="captioning prompts per image (scene, objects, parts)")


class UseBench(ModelBench):
    """CLIP + DINOv2 features (the cache-features stage) and the USE training step."""

    train_batch_sizes: list[int] = Field(default_factory=lambda: [64], description="images per training step")
    segments_per_image: int = Field(24, ge=1)


class GpuBenchConfig(_Strict):
    size: Literal["full", "tiny"] = "full"
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    total_budget_s: float = Field(440.0, gt=0, description="the whole suite, child start-ups included")
    min_start_s: float = Field(20.0, ge=0, description="a model with less budget left than this is skipped")
    kill_grace_s: float = Field(15.0, ge=0, description="a child gets this long past its budget before it is killed")
    compile_backend: str = "inductor"
    compile_mode: str | None = Field(None, description="torch.compile mode (inductor only); null: the default")
    compile_min_s: float = Field(45.0, ge=0, description="compile only with at least this much budget left")
    warmup: int = Field(1, ge=0)
    iters: int = Field(3, ge=1, description="timed calls per measurement (median)")
    matmul_n: int = Field(8192, ge=16, description="side of the square matmuls that measure the peak rate")
    sam: SamBench = Field(default_factory=lambda: SamBench(batch_sizes=[1, 4, 8]))
    gdino_t: GroundingBench = Field(default_factory=lambda: GroundingBench(variant="swin-t", batch_sizes=[1, 4, 8]))
    gdino_b: GroundingBench = Field(default_factory=lambda: GroundingBench(variant="swin-b", batch_sizes=[1, 4, 8]))
    llava: LlavaBench = Field(default_factory=lambda: LlavaBench(batch_sizes=[8, 32]))
    use: UseBench = Field(default_factory=lambda: UseBench(batch_sizes=[16, 32]))

    @classmethod
    def from_yaml(cls, path: str | Path) -> GpuBenchConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def models(self) -> list[str]:
        """Enabled models in run order."""
        return [m for m in ("sam", "gdino_t", "gdino_b", "llava", "use") if getattr(self, m).enabled]
