"""Class lists of the benchmarks, shipped as JSON in ``evaluation/data`` with their sources named.

Each file holds ``names`` (CAT-Seg's lists: the label order of the prepared datasets and the display
names) and ``synonyms`` (FC-CLIP's prompt-engineered lists, e.g. ``"wall, walls, brick wall, stone
wall, interior wall"``), both comma-separated strings per class; see ``evaluation/data/README.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ClassList:
    """``names[k]`` is the display name of label ``k``; ``vocabulary(kind)[k]`` its synonyms."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def vocabulary(self, kind: str) -> list[list[str]]:
        """Per class, the texts to embed: ``"synonyms"`` (FC-CLIP lists) or ``"names"`` (the name split at commas)."""
        if kind == "synonyms":
            return [list(s) for s in self.synonyms]
        if kind == "names":
            return [split_synonyms(n) for n in self.names]
        raise ValueError(f"unknown vocabulary {kind!r}: use 'synonyms' or 'names'")


def split_synonyms(text: str) -> list[str]:
    """``"building, edifice"`` -> ``["building", "edifice"]`` (empty parts dropped, order kept, no duplicates)."""
    return list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


@cache
def load_class_file(file_name: str) -> ClassList:
    """A shipped class list (``ade150.json`` ...)."""
    data = json.loads((DATA_DIR / file_name).read_text())
    names, synonyms = data["names"], data["synonyms"]
    if len(names) != len(synonyms):
        raise ValueError(f"{file_name}: {len(names)} names but {len(synonyms)} synonym lists")
    src = data.get("source", {})
    return ClassList(tuple(n.strip() for n in names), tuple(tuple(split_synonyms(s)) for s in synonyms),
                     "; ".join(f"{k}: {v}" for k, v in src.items()))


def plain_class_list(names: list[str], source: str) -> ClassList:
    """A class list without extra synonyms (the synthetic dataset's ``classes.json``)."""
    return ClassList(tuple(names), tuple(tuple(split_synonyms(n)) or (n,) for n in names), source)
