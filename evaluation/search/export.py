"""``query --html SITE``: the index's vectors and a text vocabulary for the shard browser's query box.

A static page cannot run the CLIP text tower, so the query box ranks segments against texts embedded
here: every distinct text of the index's segments (the most frequent ``MAX_TEXTS``) plus the texts
given on the command line. The page does the cosine ranking itself (float16 vectors, decoded in
JavaScript). Only for indexes up to ``html_max_segments`` segments: above that the file would be tens of
MB and the Python query is the tool.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import IndexConfig
from .store import atomic_write

if TYPE_CHECKING:
    from .query import SegmentIndex, TextQuery

FILE = "search-index.js"
MAX_TEXTS = 5000


def export_html(index: SegmentIndex, text_query: TextQuery, site: Path, extra_texts: list[str] = (),
                max_segments: int | None = None) -> Path:
    limit = IndexConfig().html_max_segments if max_segments is None else max_segments
    if len(index) > limit:
        raise ValueError(f"{index.store.root}: {len(index)} segments, more than the {limit} the browser export takes; "
                         "query it with `python -m evaluation query` instead")
    if not (site / "index.html").is_file():
        raise FileNotFoundError(f"{site}: not a shard browser site (no index.html); write it with "
                                "`python -m shards browse SHARDS --out SITE` first")
    counts = Counter(t["text"] for texts in index.rows["texts"].to_pylist() for t in texts)
    vocab = list(dict.fromkeys([*extra_texts, *(t for t, _ in counts.most_common(MAX_TEXTS))]))
    text_vectors = text_query.embed(vocab) if vocab else np.zeros((0, index.meta["dim"]), np.float32)
    doc = {
        "dim": index.meta["dim"], "model": index.meta["model"]["fingerprint"][:12],
        "segments": [f"{k}:{s}" for k, s in zip(index.rows["key"].to_pylist(), index.rows["segment_id"].to_pylist(),
                                                strict=True)],
        "vectors": base64.b64encode(np.ascontiguousarray(index.vectors, dtype="<f2").tobytes()).decode(),
        "texts": vocab,
        "text_vectors": base64.b64encode(np.ascontiguousarray(text_vectors, dtype="<f2").tobytes()).decode(),
    }
    path = site / FILE
    atomic_write(path, f"window.USE_SEARCH = {json.dumps(doc, separators=(',', ':'))};\n".encode())
    return path
