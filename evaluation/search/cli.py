"""``python -m evaluation index`` and ``python -m evaluation query`` (registered by :mod:`evaluation.cli`).

    python -m evaluation index --checkpoint outputs/demo/train/final --shards outputs/demo/shards \\
        --output outputs/demo/index [--limit-shards N] [--overwrite] [key=value ...]
    python -m evaluation query outputs/demo/index "a red umbrella" [--top-k 10] [--out DIR] [--html SITE]
    python -m evaluation query outputs/demo/index --segment KEY:ID [--top-k 10] [--out DIR]

Exit status: 0 done (``index``: also when ``--limit-shards`` left shards for a rerun), 2 bad input or
a corrupt / foreign / unfinished index (one line naming what and where), 130 interrupted (rerun the
same command: committed shards are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shards.overrides import OverrideError

from .config import IndexConfig
from .store import IndexFormatError

if TYPE_CHECKING:
    from .query import Hit

# torch, Ray and faiss load inside the commands that need them (``build``, ``query``, ``sheet``, ``export``):
# ``--help`` and a bad argument answer at once.

ERRORS = (IndexFormatError, OverrideError, FileNotFoundError, KeyError, ValueError)


def _fail(e: BaseException) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _index(a: argparse.Namespace) -> int:
    from .build import build_index

    try:
        cfg = IndexConfig.load(a.config, a.overrides)
        res = build_index(a.checkpoint, a.shards, a.output, cfg, limit_shards=a.limit_shards,
                          overwrite=a.overwrite, progress=not a.quiet)
    except ERRORS as e:
        return _fail(e)
    if res["done"]:
        doc = res["index"]
        print(f"index of {doc['segments']} segments from {res['shards']} shards ({doc['search']['kind']} search; "
              f"{res['embedded']} shards embedded now): {a.output}")
    else:
        print(f"{res['shards'] - res['pending']} of {res['shards']} shards indexed; rerun to index the "
              f"other {res['pending']}: {a.output}")
    return 0


def _print_hits(hits: list[Hit]) -> None:
    for h in hits:
        texts = " | ".join(f"{t['text']} ({t['source']})" for t in h.texts[:3])
        print(f"{h.rank:3d}  {h.score:.4f}  {h.key}:{h.segment_id}  {texts}")


def _parse_segment(value: str) -> tuple[str, int]:
    key, sep, sid = value.rpartition(":")
    if not sep or not key or not sid.isdigit():
        raise argparse.ArgumentTypeError(f"--segment wants KEY:ID (e.g. synth_000001:0), got {value!r}")
    return key, int(sid)


def _query(a: argparse.Namespace) -> int:
    if (a.text is None) == (a.segment is None) and not (a.html and a.text is None and a.segment is None):
        print("error: give a query text or --segment KEY:ID (not both)", file=sys.stderr)
        return 2
    from .export import export_html
    from .query import SegmentIndex, TextQuery
    from .sheet import write_hits

    try:
        index = SegmentIndex(a.index, verify=not a.no_verify)
        if a.nprobe:
            index.set_nprobe(a.nprobe)
        text_query = TextQuery(index, a.checkpoint, a.device) if (a.text is not None or a.html) else None
        hits: list[Hit] = []
        if a.segment is not None:
            hits = index.query_segment(*a.segment, k=a.top_k)
            query = {"segment": f"{a.segment[0]}:{a.segment[1]}"}
        elif a.text is not None:
            hits = text_query(a.text, a.top_k)
            query = {"text": a.text}
        if a.segment is not None or a.text is not None:
            query.update(index=str(a.index), top_k=a.top_k, search=index.kind)
            if a.json:
                print(json.dumps({"query": query, "hits": [h.to_json() for h in hits]}, indent=1))
            else:
                _print_hits(hits)
            if a.out:
                shards_dir = Path(a.shards or index.meta.get("shards_dir") or "")
                paths = write_hits(a.out, query, hits, shards_dir if shards_dir.is_dir() else None)
                print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
        if a.html:
            extra = [a.text] if a.text else []
            path = export_html(index, text_query, a.html, extra_texts=extra)
            print(f"wrote {path}", file=sys.stderr)
    except ERRORS as e:
        return _fail(e)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``index`` and ``query`` to the ``python -m evaluation`` parser."""
    p = sub.add_parser("index", help="embed every segment of a shard set into a searchable index",
                       description="USE embedding of every segment (batched; Ray Data actors with ray.mode=ray or "
                                   "a RAY_ADDRESS) -> OUTPUT/vectors.npy (float16, unit), rows.parquet, ivf.faiss "
                                   "above flat_max segments, index.json. Resumable shard by shard.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="USE model folder (config.json + model.safetensors) or hub id")
    p.add_argument("--shards", required=True, help="shard directory (or one .tar, or a brace pattern)")
    p.add_argument("--output", required=True, help="index directory (resumed when it holds a build of this model)")
    p.add_argument("--config", default=None, help="YAML config (evaluation.search.config.IndexConfig)")
    p.add_argument("--limit-shards", type=int, default=None, help="embed at most N more shards, then stop")
    p.add_argument("--overwrite", action="store_true", help="discard a previous index in OUTPUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: batch_size, flat_max, ivf.nprobe, ray.mode, ray.num_actors, ...")
    p.set_defaults(func=_index)

    q = sub.add_parser("query", help="the segments of an index nearest to a text or to one of its segments",
                       description="Prints rank, cosine score, KEY:SEGMENT and texts of the top-k hits; --out "
                                   "writes hits.json and contact_sheet.png; --html exports the index's vectors and "
                                   "text vocabulary for the shard browser's query box.")
    q.add_argument("index", type=Path, help="index directory")
    q.add_argument("text", nargs="?", default=None, help="query text, e.g. 'a red umbrella'")
    q.add_argument("--segment", type=_parse_segment, default=None, help="KEY:ID: segments similar to this one")
    q.add_argument("--top-k", type=int, default=10, help="number of hits (default 10)")
    q.add_argument("--out", type=Path, default=None, help="folder for hits.json and contact_sheet.png")
    q.add_argument("--html", type=Path, default=None, metavar="SITE",
                   help="a `python -m shards browse` site: write SITE/search-index.js for its query box")
    q.add_argument("--shards", default=None, help="shard directory for the contact sheet (default: the indexed one)")
    q.add_argument("--checkpoint", default=None, help="the index's model at another path (checked by fingerprint)")
    q.add_argument("--device", default=None, help="model device (default cuda if available)")
    q.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default: the index's)")
    q.add_argument("--json", action="store_true", help="print the hits as JSON")
    q.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files")
    q.set_defaults(func=_query)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (tests); ``python -m evaluation`` reaches the same commands."""
    ap = argparse.ArgumentParser(prog="python -m evaluation")
    register(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(argv)
    return int(a.func(a) or 0)
