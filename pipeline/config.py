"""The typed configuration of a curation job, loaded from YAML and overridden from the command line.

One YAML file per job kind lives in ``pipeline/configs/`` (found by name: ``--config coco`` is
``pipeline/configs/coco.yaml``); every key has a documented default here (``python -m pipeline config
show CONFIG`` prints them all), so a config file only says what differs. ``key=value`` overrides use
dotted paths (``shards.max_samples=100 grounder.box_threshold=0.3``) and YAML values, parsed by the
project's one override parser (``shards.overrides``): an unknown key names itself, where it came
from and the closest valid key.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.stages.config import CaptionerConfig, GrounderConfig, PhraseConfig, SegmenterConfig
from shards import overrides, storage
from shards.image import MAX_BYTES, MAX_PIXELS, MIN_SIDE, ReadPolicy

STAGES = ("captioner", "phrases", "grounder", "segmenter")
_DEFAULT_IMPL = {
    "captioner": "pipeline.stages.captioner:Captioner",
    "phrases": "pipeline.stages.phrases:PhraseExpander",
    "grounder": "pipeline.stages.grounder:Grounder",
    "segmenter": "pipeline.stages.segmenter:Segmenter",
}
#: Bundled job configs, found by name from anywhere (``--config coco``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A job config that cannot run; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """Where the images and annotations are: paths or ``s3://`` / ``gs://`` URLs. Also from the CLI flags."""

    kind: Literal["coco", "vg", "folder"] = Field("coco", description="source format")
    name: str = Field("", description="dataset name: the key prefix, record.source and the text source of "
                                      "annotation texts; empty means the kind (the synthetic dataset is a "
                                      "COCO source named synth)")
    images: str = Field("", description="image directory (--images); every file read must resolve inside it")
    annotations: str = Field("", description="COCO instances JSON or VG image_data.json (--annotations)")
    captions: str = Field("", description="COCO captions JSON, optional (--captions)")
    regions: str = Field("", description="VG region_descriptions.json (--regions)")
    extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp"],
                                  description="folder source: file suffixes picked up (case-insensitive)")
    limit: int = Field(0, ge=0, description="stop after this many images (0 = all); for smoke runs")
    keep_crowd: bool = Field(False, description="coco: keep iscrowd annotations (one mask over a group); skipped "
                                                "by default, as detection and segmentation training do")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> SourceConfig:
        """A field another kind of source reads is an error, not silently ignored (``--regions`` on a COCO job)."""
        wrong = [f"source.{name} (read by {'/'.join(kinds)} sources only)"
                 for name, kinds in _KIND_FIELDS.items()
                 if self.kind not in kinds and getattr(self, name) != type(self).model_fields[name].get_default(
                     call_default_factory=True)]
        if wrong:
            raise ValueError(f"a {self.kind} source does not use {', '.join(wrong)}")
        for name in ("images", "annotations", "captions", "regions"):
            storage.check_url(getattr(self, name), f"source.{name}")
        return self

    @property
    def dataset(self) -> str:
        return self.name or self.kind


#: Source fields that only some kinds read (the rest are common to all).
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "annotations": ("coco", "vg"), "captions": ("coco",), "keep_crowd": ("coco",), "regions": ("vg",),
    "extensions": ("folder",),
}


class ReadConfig(_Strict):
    """How images are read and checked before any model sees them (one read per image)."""

    verify: Literal["header", "draft", "full"] = Field(
        "draft", description="draft: decode once at reduced JPEG scale (catches truncation cheaply); full: the "
                             "stages' decoder; header: parse the header only")
    min_side: int = Field(MIN_SIDE, ge=1, description="images with a shorter side fail (the stages' decoder "
                                                      "uses the same limit)")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="decompression-bomb limit in pixels")
    max_bytes: int = Field(MAX_BYTES, ge=1, description="files larger than this fail without being read")
    follow_symlinks_outside: bool = Field(False, description="read files whose symlinks resolve outside "
                                                             "source.images (refused by default)")
    batch_size: int = Field(16, ge=1, description="images per read task batch")
    exif: Literal["reject", "trust"] = Field(
        "reject", description="annotated images with an EXIF orientation other than 1: reject (annotations are "
                              "taken to be in the stored frame, so masks would not line up) or trust (annotations "
                              "were drawn on the oriented image and are used as they are)")

    def policy(self) -> ReadPolicy:
        """The one decoder's policy (``shards.image``) that the read step and every model stage apply."""
        return ReadPolicy(min_side=self.min_side, max_pixels=self.max_pixels, max_bytes=self.max_bytes)


class RayConfig(_Strict):
    """Where to run, and how often Ray retries. Per-stage pools (``num_actors``, ``num_gpus``,
    ``num_cpus``, ``batch_size``) are keys of each stage's own section (``pipeline.stages.config``)."""

    address: str = Field("", description="cluster to join; empty: RAY_ADDRESS if set, else a local Ray")
    num_cpus: int | None = Field(None, description="local Ray only: CPUs to offer (null: detect)")
    num_gpus: int | None = Field(None, description="local Ray only: GPUs to offer (null: detect)")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per read / NMS task")
    task_retries: int = Field(3, ge=0, description="retries of a read / NMS task whose worker died "
                                                   "(Ray Data's default is unlimited)")
    max_restarts: int = Field(1000, ge=0, description="restarts of a model stage actor over the whole job "
                                                      "(one per crash; Ray Data's default is unlimited): each "
                                                      "batch is bounded by max_task_retries, each image by "
                                                      "image_attempts")
    max_task_retries: int = Field(4, ge=0, description="retries of a model stage batch whose actor died")
    image_attempts: int = Field(2, ge=1, description="times a stage's process may die or time out with an "
                                                     "image in hand before that image becomes a failure")
    batch_timeout_s: float = Field(1800.0, ge=0, description="time limit of one model stage batch; past it the "
                                                             "actor is restarted and the batch isolated "
                                                             "(0: none)")


class NmsConfig(_Strict):
    """Mask NMS over each image's segments (texts of duplicates merged)."""

    enabled: bool = Field(True, description="run mask NMS")
    iou_threshold: float = Field(0.8, gt=0, le=1, description="mask IoU above which a segment is a duplicate of "
                                 "a higher-scored one (0.8 removes near-identical SAM masks of one object and "
                                 "keeps part/whole pairs)")
    batch_size: int = Field(16, ge=1, description="images per NMS task batch")


class ShardsConfig(_Strict):
    """Shard files of the output directory."""

    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$",
                        description="shard file prefix (PREFIX-NNNNNN.tar); letters, digits, _ and - only")
    max_samples: int = Field(1000, ge=1, description="samples per shard")
    max_bytes: int = Field(1 << 30, ge=1, description="bytes per shard (a shard closes once past it)")
    min_segments: int = Field(1, ge=0, description="an image with fewer segments fails (stage nms): the "
                                                   "trainer learns only from segments")
    writers: int | Literal["driver"] = Field(
        4, description="write tasks running at once in the Ray workers, each committing whole shards (on a "
                       "cluster the output must be storage every node reaches); 'driver': the old single "
                       "writer in the driver process, every image through it (for comparison)")

    @model_validator(mode="after")
    def _writers(self) -> ShardsConfig:
        if self.writers != "driver" and self.writers < 1:
            raise ValueError(f"writers must be a positive number or 'driver', got {self.writers}")
        return self


def _off(cls: type) -> Any:
    return Field(default_factory=lambda: cls(enabled=False), description=f"{cls.__doc__.splitlines()[0]}")


class JobConfig(_Strict):
    """A job. A stage section present in YAML is on unless it says ``enabled: false``."""

    source: SourceConfig = Field(default_factory=SourceConfig, description=SourceConfig.__doc__)
    read: ReadConfig = Field(default_factory=ReadConfig, description=ReadConfig.__doc__)
    captioner: CaptionerConfig = _off(CaptionerConfig)
    phrases: PhraseConfig = _off(PhraseConfig)
    grounder: GrounderConfig = _off(GrounderConfig)
    segmenter: SegmenterConfig = _off(SegmenterConfig)
    impl: dict[str, str] = Field(default_factory=dict, description="replace a stage by another implementation, "
                                 "{stage: 'module:Class'}; it gets the stage's config")
    nms: NmsConfig = Field(default_factory=NmsConfig, description=NmsConfig.__doc__)
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description=ShardsConfig.__doc__)
    ray: RayConfig = Field(default_factory=RayConfig, description=RayConfig.__doc__.split("\n")[0])
    write_batch_size: int = Field(32, ge=1, description="shards.writers=driver only: rows per batch the driver "
                                                       "pulls into its shard writer")

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
    try:
        data.update(overrides.apply(data, [assignment]))
    except overrides.OverrideError as e:
        raise ConfigError(str(e)) from e


def find_config(name: str | Path) -> Path:
    """A config path as given, else a bundled config by name (``coco`` or ``coco.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if p.parent == Path(".") and candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {p} not found (bundled configs: {bundled})")


def load_config(path: str | Path | None = None, assignments: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML job config (``safe_load`` only, a path or a bundled name), apply overrides, validate."""
    data: dict[str, Any] = {}
    where = ""
    if path:
        p = find_config(path)
        where = f"{p}: "
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
    try:
        if path:
            overrides.check_keys(data, JobConfig, f"in {p}")
        data = overrides.apply(data, assignments, JobConfig)
    except overrides.OverrideError as e:
        raise ConfigError(str(e)) from e
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:  # one line naming every bad key
        raise ConfigError(f"{where}invalid job config: {one_line(e)}") from e


def one_line(e: ValidationError) -> str:
    """A pydantic error as one line: ``key.path: message (got value)`` for each error."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = f" (got {err['input']!r})" if err.get("type") != "missing" and not isinstance(err.get("input"), dict) else ""
        parts.append(f"{loc + ': ' if loc else ''}{err['msg']}{got}")
    return "; ".join(parts)


# -- what identifies a job's data, and how a config reads -----------------------------------------
#: Fields of stage sections that change how fast a job runs, not what it writes: left out of the fingerprint.
_NOT_DATA = {"batch_size", "num_actors", "num_gpus", "num_cpus", "models_dir", "device", "generate_batch_size",
             "prompt_batch_size", "image_batch_size", "pipe_batch_size", "boxes_per_batch", "max_pixels"}
_NOT_DATA_PATHS = {("ray",), ("write_batch_size",), ("source", "limit"), ("shards", "max_samples"),
                   ("shards", "max_bytes"), ("shards", "writers")}


def data_fields(cfg: JobConfig) -> dict[str, Any]:
    """The config's data-affecting fields, flattened to dotted keys, paths made absolute.

    Two configs with equal data fields write the same samples, so their jobs can share an output
    directory (a rerun resumes); pool sizes, batch sizes, retries, shard sizes and ``source.limit``
    do not count.
    """
    out: dict[str, Any] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if path in _NOT_DATA_PATHS or (path[:1] and path[0] in STAGES and path[-1] in _NOT_DATA) or path[-1:] == ("batch_size",):
            return
        if isinstance(node, dict) and path != ("impl",):
            for k, v in node.items():
                walk(v, (*path, k))
            return
        key = ".".join(path)
        if path[:1] == ("source",) and path[-1] in ("images", "annotations", "captions", "regions") and node:
            node = node.rstrip("/") if storage.is_remote(node) else str(Path(node).expanduser().resolve())
        out[key] = node

    data = cfg.model_dump(mode="json")
    for name in STAGES:  # a stage that is off has no settings that matter
        if not data[name]["enabled"]:
            data[name] = {"enabled": False}
    walk(data, ())
    return out


def describe(model: type[BaseModel] | BaseModel, indent: int = 0) -> list[str]:
    """YAML lines of a (resolved) config with each key's description as a comment."""
    lines = []
    values = model if isinstance(model, BaseModel) else None
    cls = type(model) if values is not None else model
    pad = "  " * indent
    for name, field in cls.model_fields.items():
        value = getattr(values, name) if values is not None else field.get_default(call_default_factory=True)
        doc = " ".join((field.description or "").split())
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:{'  # ' + doc.splitlines()[0] if doc else ''}")
            lines.extend(describe(value, indent + 1))
            continue
        dumped = yaml.safe_dump({name: value if not isinstance(value, tuple) else list(value)},
                                default_flow_style=True, width=10_000, sort_keys=False).strip()
        lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}{'  # ' + doc if doc else ''}")
    return lines
