"""The typed configuration of a curation job, loaded from YAML and overridden from the command line.

One YAML file per job kind lives in ``pipeline/configs/``; every key has a documented default here,
so a config file only says what differs. ``key=value`` overrides use dotted paths
(``shards.max_samples=100 grounder.box_threshold=0.3``) and YAML values (``true``, ``0.3``,
``[a, b]``), applied to the raw mapping before validation so that errors name the final value.

The four model stages keep their own typed sections (``pipeline.stages.config``: model, thresholds,
and their Ray pool: ``num_actors``, ``num_gpus``, ``num_cpus``, ``batch_size``), validated at load
time so that a typo stops the job before any actor starts. Stage *classes* are imported only for
stages that are on (``impl`` can replace one by ``module:Class``), so a job whose model stages are
all off never imports torch or transformers: the annotation path runs on machines without weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.images import MAX_PIXELS, MIN_SIDE
from pipeline.stages.config import CaptionerConfig, GrounderConfig, PhraseConfig, SegmenterConfig

STAGES = ("captioner", "phrases", "grounder", "segmenter")
_DEFAULT_IMPL = {
    "captioner": "pipeline.stages.captioner:Captioner",
    "phrases": "pipeline.stages.phrases:PhraseExpander",
    "grounder": "pipeline.stages.grounder:Grounder",
    "segmenter": "pipeline.stages.segmenter:Segmenter",
}


class ConfigError(ValueError):
    """A job config that cannot run; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """Where the images and annotations are. Paths may also come from the CLI flags."""

    kind: Literal["coco", "vg", "folder"] = "coco"
    #: Dataset name: the key prefix, ``record.source`` and the text source of annotation texts.
    #: Empty means the kind (``coco``...); the synthetic dataset is a COCO source named ``synth``.
    name: str = ""
    images: str = ""
    annotations: str = ""  # COCO instances JSON; VG image_data.json
    captions: str = ""  # COCO captions JSON (optional)
    regions: str = ""  # VG region_descriptions.json
    #: Folder source: file suffixes to pick up (case-insensitive).
    extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp"])
    #: Stop after this many images (0 = all); for smoke runs on a big dataset.
    limit: int = Field(0, ge=0)

    @property
    def dataset(self) -> str:
        return self.name or self.kind


class ReadConfig(_Strict):
    """How images are read and checked before any model sees them (one read per image)."""

    #: ``draft`` decodes every image once at reduced JPEG scale (catches truncation cheaply);
    #: ``full`` runs ``pipeline.images.decode``; ``header`` only parses the header.
    verify: Literal["header", "draft", "full"] = "draft"
    #: Images with a side shorter than this become failures (a 1x1 image holds no segment);
    #: the same default as ``pipeline.images.decode`` so that no stage rejects what the read kept.
    min_side: int = Field(MIN_SIDE, ge=1)
    #: Decompression-bomb limit in pixels (``pipeline.images.MAX_PIXELS``; PIL itself refuses
    #: more than 2 x 89,478,485 at open).
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    batch_size: int = Field(16, ge=1)


class RayConfig(_Strict):
    """Where to run. Per-stage pools (``num_actors``, ``num_gpus``, ``num_cpus``, ``batch_size``)
    are keys of each stage's own section (``pipeline.stages.config``)."""

    #: Cluster to join; empty = ``RAY_ADDRESS`` if set, else a local Ray.
    address: str = ""
    #: Local Ray only: CPUs/GPUs to offer (None = detect).
    num_cpus: int | None = None
    num_gpus: int | None = None
    #: CPUs per read / NMS task.
    task_cpus: float = Field(1.0, gt=0)


class NmsConfig(_Strict):
    enabled: bool = True
    #: Mask IoU above which a segment is a duplicate of a higher-scored one (*open* in the paper;
    #: 0.8 removes near-identical SAM masks of one object and keeps part/whole pairs).
    iou_threshold: float = Field(0.8, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


class ShardsConfig(_Strict):
    prefix: str = "shard"
    max_samples: int = Field(1000, ge=1)
    max_bytes: int = Field(1 << 30, ge=1)
    #: An image that ends with fewer segments becomes a failure (stage ``nms``): the trainer
    #: learns only from segments.
    min_segments: int = Field(1, ge=0)


def _off(cls: type) -> Any:
    return Field(default_factory=lambda: cls(enabled=False))


class JobConfig(_Strict):
    """A job. A stage section present in YAML is on unless it says ``enabled: false``."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    captioner: CaptionerConfig = _off(CaptionerConfig)
    phrases: PhraseConfig = _off(PhraseConfig)
    grounder: GrounderConfig = _off(GrounderConfig)
    segmenter: SegmenterConfig = _off(SegmenterConfig)
    #: Replace a stage by another implementation, ``{stage: "module:Class"}``; it gets the stage's config.
    impl: dict[str, str] = Field(default_factory=dict)
    nms: NmsConfig = Field(default_factory=NmsConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    #: Rows per batch the driver pulls into the shard writer.
    write_batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _impl_names(self) -> JobConfig:
        unknown = sorted(set(self.impl) - set(STAGES))
        if unknown:
            raise ValueError(f"impl names unknown stages {unknown}; stages are {list(STAGES)}")
        return self

    def enabled_stages(self) -> list[str]:
        return [n for n in STAGES if getattr(self, n).enabled]

    def stage_class(self, name: str) -> type:
        """The stage's class, imported only now: model code loads only for stages that run."""
        return import_object(self.impl.get(name) or _DEFAULT_IMPL[name], f"impl.{name}")


def import_object(path: str, what: str) -> Any:
    """``module:Name`` to the object, with an error that says which config key was wrong."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"{what} must be 'module:Name', got {path!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what}: cannot import {path!r} ({e})") from e


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to a nested mapping in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML job config (``safe_load`` only), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
    for o in overrides:
        apply_override(data, o)
    try:
        return JobConfig.model_validate(data)
    except ConfigError:
        raise
    except Exception as e:  # pydantic.ValidationError names every bad key
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}invalid job config: {e}") from e
