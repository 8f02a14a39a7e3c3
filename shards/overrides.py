"""``key.path=value`` overrides of a YAML config, shared by the pipeline and the trainer.

One parser for every command line of the project: values are YAML (``0.3``, ``true``, ``[a, b]``,
``{k: v}``), keys are dotted paths into the nested mapping, and a key that the typed config does not
have is reported with where it came from (the command line or the YAML file) and the closest valid
key (``difflib``), before pydantic's own validation runs. It lives in ``shards`` because that is the
one package both the pipeline and the trainer import; it depends on PyYAML only and reads the
config class through pydantic's public ``model_fields`` / ``model_config`` (no pydantic import).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

COMMAND_LINE = "on the command line"


class OverrideError(ValueError):
    """A malformed or unknown override or config key; the message names the key and where it came from."""


def parse(assignment: str) -> tuple[list[str], Any]:
    """``"a.b=0.3"`` -> ``(["a", "b"], 0.3)``; the value is parsed as YAML (empty means ``""``)."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip():
        raise OverrideError(f"override {assignment!r} must look like key.path=value")
    if not all(parts):
        raise OverrideError(f"override {assignment!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise OverrideError(f"override {assignment!r}: the value is not valid YAML ({e})") from e
    return parts, value


def apply(data: Mapping[str, Any], assignments: Iterable[str], model: Any = None) -> dict[str, Any]:
    """A deep copy of ``data`` with every assignment applied in order.

    With ``model`` (a pydantic model class), each key is first checked against it: an unknown key
    raises :class:`OverrideError` naming it, "on the command line" and the closest valid key.
    """
    out = copy.deepcopy(dict(data))
    for assignment in assignments:
        parts, value = parse(assignment)
        if model is not None:
            check_path(model, parts, COMMAND_LINE)
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise OverrideError(f"override {assignment!r}: {'.'.join(parts[:i + 1])!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def check_keys(data: Mapping[str, Any], model: Any, origin: str) -> None:
    """Every key of ``data`` (recursively) exists in ``model``; ``origin`` says where ``data`` came from
    (``"in jobs/coco.yaml"``)."""
    for path in _paths(data):
        check_path(model, path, origin)


def check_path(model: Any, parts: list[str], origin: str) -> None:
    """Raise :class:`OverrideError` unless ``parts`` is a key path of ``model`` (free-form mappings end the check)."""
    node = model
    for i, p in enumerate(parts):
        fields = getattr(node, "model_fields", None)
        if fields is None:  # a plain mapping (``impl``, ``prompts``...) or a leaf: its keys are free
            if i > 0 and not _is_mapping(node):
                raise OverrideError(f"unknown key {'.'.join(parts)!r} {origin}: "
                                    f"{'.'.join(parts[:i])!r} is a value, not a section")
            return
        if p not in fields:
            if getattr(node, "model_config", {}).get("extra") != "forbid":
                return
            prefix = ".".join(parts[:i])
            known = [f"{prefix}.{k}" if prefix else k for k in fields]
            wanted = ".".join(parts[: i + 1])
            close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(sorted(known))}"
            raise OverrideError(f"unknown config key {wanted!r} {origin}{hint}")
        node = _field_type(fields[p].annotation)


def _field_type(annotation: Any) -> Any:
    """The pydantic model class of a field (through ``X | None``), else the annotation itself."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if hasattr(arg, "model_fields"):
            return arg
    return annotation


def _is_mapping(annotation: Any) -> bool:
    origin = getattr(annotation, "__origin__", annotation)
    if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return True
    return any(_is_mapping(a) for a in getattr(annotation, "__args__", ()) or () if a is not type(None))


def _paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[list[str]]:
    for k, v in data.items():
        path = [*prefix, str(k)]
        if isinstance(v, Mapping) and v:
            yield from _paths(v, tuple(path))
        else:
            yield path


__all__ = ["COMMAND_LINE", "OverrideError", "apply", "check_keys", "check_path", "parse"]


def load_yaml(path: str | Path, model: Any, assignments: Iterable[str] = ()) -> Any:
    """A typed config from a YAML file and ``key=value`` overrides: unknown keys in the file or on the
    command line are named with their origin (one loader for every package's config)."""
    try:
        data: Any = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise OverrideError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise OverrideError(f"config {path} must be a mapping")
    check_keys(data, model, f"in {path}")
    return model.model_validate(apply(data, assignments, model))
