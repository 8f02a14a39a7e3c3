"""Validation of annotation files, so that a malformed file stops the job at start.

pydantic models of the parts of the COCO and Visual Genome formats the sources use (extra keys are
allowed: real files carry ``info``, ``licenses``, ``coco_url``...). Errors are reported with the
file and the JSON path of the first offending values, e.g.
``instances.json: annotations[12].segmentation: Input should be a valid list``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from .base import SourceError

M = TypeVar("M", bound=BaseModel)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class CocoImage(_Loose):
    id: int | str
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class CocoCategory(_Loose):
    id: int
    name: str


class CocoRle(_Loose):
    counts: list[int] | str
    size: list[int] = Field(min_length=2, max_length=2)


class CocoAnnotation(_Loose):
    image_id: int | str
    category_id: int
    segmentation: list[list[float]] | CocoRle
    iscrowd: int = 0


class CocoInstances(_Loose):
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory]


class CocoCaption(_Loose):
    image_id: int | str
    caption: str


class CocoCaptions(_Loose):
    images: list[CocoImage] = Field(default_factory=list)
    annotations: list[CocoCaption]


class VgImage(_Loose):
    image_id: int | str = Field(validation_alias=AliasChoices("image_id", "id"))
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    url: str = ""


class VgRegion(_Loose):
    phrase: str
    x: float
    y: float
    width: float
    height: float


class VgImageRegions(_Loose):
    image_id: int | str = Field(validation_alias=AliasChoices("id", "image_id"))
    regions: list[VgRegion]


def load_json(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not str(path):
        raise SourceError(f"no {what} file given")
    if not p.is_file():
        raise SourceError(f"{what} file {p} not found")
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{p}: not valid JSON ({e})") from e


def validate(data: Any, model: type[M], path: str | Path) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SourceError(f"{path}: malformed {model.__name__} file: {_errors(e)}") from e


def validate_list(data: Any, model: type[M], path: str | Path) -> list[M]:
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of {model.__name__} objects, got {type(data).__name__}")
    out = []
    for i, d in enumerate(data):
        try:
            out.append(model.model_validate(d))
        except ValidationError as e:
            raise SourceError(f"{path}: malformed entry [{i}]: {_errors(e)}") from e
    return out


def _errors(e: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in e.errors()[:limit]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        parts.append(f"{loc or '(top level)'}: {err['msg']}")
    more = e.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
