"""Typed settings of ``python -m evaluation semseg`` (YAML in ``evaluation/configs/``, ``key=value`` overrides).

Defaults follow named peers: 640-pixel short side for inference (SED, SAN; detectron2's
``ResizeShortestEdge`` with a 2560 cap), CLIP's 80 ImageNet templates averaged over each synonym
(SED, ProxyCLIP), segment-anything's automatic mask generation defaults (``AMGConfig``). Every
choice is written to ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shards import overrides

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AMGConfig(_Strict):
    """Automatic mask generation settings; defaults are segment-anything's ``SamAutomaticMaskGenerator``."""

    model: str = Field("facebook/sam-vit-huge", description="SAM weights: local directory or hub id (resolved "
                       "like the curation job's, never downloaded here)")
    models_dir: str | None = Field(None, description="where `python -m pipeline models download` put weights")
    device: str | None = Field(None, description="torch device; None: cuda if available, else cpu")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU (the prompt encoder always float32)")
    points_per_side: int = Field(32, ge=1, description="point grid side of the first crop layer")
    points_per_batch: int = Field(64, ge=1, description="point prompts per mask-decoder forward")
    pred_iou_thresh: float = Field(0.88, description="keep masks whose predicted IoU is above this; <= 0: off")
    stability_score_thresh: float = Field(0.95, description="keep masks at least this stable; <= 0: off")
    stability_score_offset: float = Field(1.0, ge=0, description="logit offset of the stability score")
    mask_threshold: float = Field(0.0, description="logit at which masks are binarised (SAM's mask_threshold)")
    box_nms_thresh: float = Field(0.7, ge=0, le=1, description="box IoU of the NMS within a crop")
    crop_n_layers: int = Field(0, ge=0, description="crop layers beyond the whole image (layer i: (2**i)**2 crops)")
    crop_nms_thresh: float = Field(0.7, ge=0, le=1, description="box IoU of the NMS across crops")
    crop_overlap_ratio: float = Field(512 / 1500, ge=0, lt=1, description="crop overlap, fraction of the short side")
    crop_n_points_downscale_factor: int = Field(1, ge=1, description="points per side / factor**layer in deeper layers")
    min_mask_region_area: int = Field(0, ge=0, description="holes and islands under this many pixels removed; 0: off")
    crop_batch_size: int = Field(4, ge=1, description="crops per image-encoder forward")
    mask_pixel_budget: int = Field(1 << 26, ge=1, description="upscaled mask pixels decoded at once")


class PromptConfig(_Strict):
    """Class texts: which names, which templates, how synonyms combine (see ``evaluation.classify``)."""

    vocabulary: Literal["synonyms", "names"] = Field(
        "synonyms", description="synonyms: FC-CLIP's synonym lists; names: CAT-Seg's class names (split at commas)")
    templates: str | list[str] = Field("imagenet80", description="imagenet80 (CLIP's 80), identity, photo, or a list "
                                                                 "of '{}' format strings")
    combine: Literal["mean", "max"] = Field("mean", description="mean of synonym embeddings (SED) or max of their "
                                                                 "similarities (ProxyCLIP)")
    text_batch_size: int = Field(256, ge=1, description="texts per text-tower forward")


class ResizeConfig(_Strict):
    """Inference resolution of the SAM path; predictions are resized back (nearest) and scored at the
    ground truth's resolution. The oracle path embeds and votes at the ground truth's resolution."""

    short_side: int = Field(640, ge=0, description="short side for inference (SED/SAN: 640); 0: original size")
    max_long_side: int = Field(2560, ge=1, description="cap on the long side after the resize (detectron2's max_size)")


class AggregateConfig(_Strict):
    uncovered: Literal["nearest", "image"] = Field(
        "nearest", description="pixels no mask covers: label of the nearest covered pixel, or the whole image's class")


class RayEvalConfig(_Strict):
    """Where images are evaluated: Ray Data actors (each loads SAM and USE once), or in this process."""

    enabled: bool = Field(True, description="false: evaluate in this process without Ray")
    address: str = Field("", description="cluster to join; empty: RAY_ADDRESS if set, else a local Ray")
    num_actors: int = Field(1, ge=1, description="evaluation actors (one per GPU on a GPU cluster)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on GPU machines)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor")
    start_timeout_s: int = Field(600, ge=0, description=(
        "wait until every actor has loaded its models before images are handed out, so the pool shares the "
        "work from the first image; an error if they are not up by then (0: hand out as actors come up)"))
    local_num_cpus: int | None = Field(None, description="local Ray only: CPUs to offer (null: detect)")
    local_num_gpus: int | None = Field(None, description="local Ray only: GPUs to offer (null: detect)")


class EvalConfig(_Strict):
    device: str | None = Field(None, description="USE model device; null: cuda if available, else cpu")
    prompts: PromptConfig = PromptConfig()
    resize: ResizeConfig = ResizeConfig()
    aggregate: AggregateConfig = AggregateConfig()
    sam: AMGConfig = AMGConfig()
    proposal_cache: str | None = Field(None, description="proposal cache folder; null: OUTPUT/proposals (shared "
                                                         "by runs that point here)")
    embed_batch_size: int = Field(64, ge=1, description="masks per area-weight block (memory bound of one image)")
    overlays: int = Field(8, ge=0, description="overlays written for the first N images")
    ray: RayEvalConfig = RayEvalConfig()

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, assignments: list[str] | tuple[str, ...] = ()) -> EvalConfig:
        """Load ``path`` (default ``configs/default.yaml``), apply ``key=value`` overrides, validate.

        Unknown keys are reported with where they came from and the closest valid key
        (:mod:`shards.overrides`)."""
        return overrides.load_yaml(Path(path) if path else DEFAULT_CONFIG, cls, assignments)
