"""The USE trainer: the segment embedding model (:class:`USEModel`), its training loop and CLI.

``from trainer import USEModel`` is the model API (load, ``embed_masks``, ``encode_text``). It is
imported lazily (PEP 562) so that ``python -m trainer --help`` and config-only imports do not pay
for torch and the backbones.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"USEModel": "trainer.model", "ModelConfig": "trainer.model", "TrainConfig": "trainer.config"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
