"""``python -m shards browse DIR --out SITE``: a static, self-contained shard browser.

Opened from disk (``file://``), no server, no network: everything is in SITE.

```
SITE/index.html, app.js, style.css   the page (vanilla JavaScript, no library, no CDN)
SITE/data/index.js                   stats, histograms, failures, and every sample's segments (id, area,
                                     score, texts with source and score): what search and filters read
SITE/data/masks-NNNNN.js             the segments' COCO RLE strings, CHUNK samples per file, loaded by
                                     <script> tags when a page shows one of their samples
SITE/images/KEY.jpg                  the image, long side at most THUMB px (JPEG)
SITE/search-index.js                 ``window.USE_SEARCH``: null, or the data `python -m evaluation
                                     query INDEX --html SITE` writes for the query box (kept on rebuild)
```

Masks travel as RLE and are decoded in the browser (``app.js``, pycocotools' string format): an RLE
string is a few hundred bytes where a pre-rendered PNG layer per segment would be kilobytes, so the
images dominate a site's size (measured in README: ~25 KB per COCO sample). Data goes in ``.js``
files rather than ``.json`` because a page opened from disk may not ``fetch`` files beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import storage
from ..image import ImageDecodeError
from ..reader import iter_samples
from ..stats import summarize
from ..writer import failure_records, list_shards

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
THUMB = 384  # px, long side of the images in the site
QUALITY = 82  # JPEG quality of the images
CHUNK = 50  # samples per mask file
AREA_BINS = [0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0000001]  # fraction of the image, log-spaced


def _thumb(image: Image.Image) -> Image.Image:
    w, h = image.size
    scale = min(1.0, THUMB / max(w, h))
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return image.convert("RGB")


def _js(name: str, value: Any) -> bytes:
    return f"{name} = {json.dumps(value, separators=(',', ':'), ensure_ascii=False)};\n".encode()


def _histogram(values: list[float], bins: list[float] | None = None) -> dict[str, list]:
    """``{labels, counts}``: integer bins 0..max (at most 30, the last one open) or the given edges."""
    if bins is None:
        top = int(max(values, default=0))
        if top < 30:
            counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=top + 1).tolist() if values else [0]
            return {"labels": [str(i) for i in range(len(counts))], "counts": counts}
        edges = np.linspace(0, top + 1, 31)
        counts, _ = np.histogram(values, bins=edges)
        return {"labels": [f"{int(a)}-{int(b) - 1}" for a, b in zip(edges[:-1], edges[1:], strict=True)],
                "counts": counts.tolist()}
    counts, _ = np.histogram(values, bins=bins)
    labels = [f"{100 * a:g}-{100 * min(b, 1):g}%" for a, b in zip(bins[:-1], bins[1:], strict=True)]
    return {"labels": labels, "counts": counts.tolist()}


def build_site(directory: str | Path, out: str | Path, *, limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write the site for the shards in ``directory`` (a folder or an ``s3://`` / ``gs://`` prefix); returns
    ``{samples, segments, bytes, path}``."""
    directory, out = (directory if storage.is_remote(directory) else Path(directory)), Path(out)
    tars = list_shards(directory)
    if not tars:
        raise FileNotFoundError(f"no shards (*-NNNNNN.tar) in {directory}")
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    sources: list[str] = []
    src_index: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    chunk: dict[str, list[str]] = {}
    per_image, per_segment, area_frac = [], [], []
    failures = [{"key": k, "stage": f.get("stage", ""), "error": f.get("error", "")}
                for k, f in sorted(failure_records(directory, finish_commits=False).items())]
    bad_samples = 0

    def flush_chunk() -> None:
        if chunk:
            n = (len(samples) - 1) // CHUNK
            (out / "data" / f"masks-{n:05d}.js").write_bytes(
                f"USE_BROWSE_MASKS({n},{json.dumps(chunk, separators=(',', ':'))});\n".encode())
            chunk.clear()

    it = (s for tar in tars for s in iter_samples(tar, on_error="skip"))
    for sample in tqdm(it, desc="browse", unit="sample", disable=not progress):
        if limit is not None and len(samples) >= limit:
            break
        meta = sample.meta
        try:
            image = sample.image()
        except (ImageDecodeError, OSError) as e:
            bad_samples += 1
            failures.append({"key": meta.key, "stage": "browse", "error": f"image not decoded: {e}"})
            continue
        thumb = _thumb(image)
        thumb.save(out / "images" / f"{meta.key}.jpg", format="JPEG", quality=QUALITY, optimize=True)
        segs = []
        for seg in meta.segments:
            texts = []
            for t in seg.texts:
                if t.source not in src_index:
                    src_index[t.source] = len(sources)
                    sources.append(t.source)
                texts.append([t.text, src_index[t.source], round(float(t.score), 4)])
            segs.append([seg.id, int(seg.area), round(float(seg.score), 4), texts, [round(float(v), 1) for v in seg.bbox]])
            per_segment.append(len(seg.texts))
            area_frac.append(seg.area / max(1, meta.width * meta.height))
        per_image.append(len(meta.segments))
        shard = Path(sample.url).name if sample.url else ""
        samples.append({"k": meta.key, "sh": shard, "src": meta.source, "w": meta.width, "h": meta.height,
                        "tw": thumb.width, "th": thumb.height, "g": segs,
                        "cap": [c.text for c in meta.captions][:3]})
        chunk[meta.key] = [seg.rle["counts"] for seg in meta.segments]
        if len(samples) % CHUNK == 0:
            flush_chunk()
    flush_chunk()
    summary = summarize(directory)
    text_sources = Counter({s: 0 for s in sources})
    for s in samples:
        for seg in s["g"]:
            text_sources.update(sources[t[1]] for t in seg[3])
    data = {
        "title": storage.basename(directory), "chunk": CHUNK, "sources": sources, "samples": samples, "failures": failures,
        "stats": {"shards": summary["shards"], "images": summary["images"], "segments": summary["segments"],
                  "texts": summary["texts"], "failures": summary["failures"], "shown": len(samples),
                  "unreadable": bad_samples, "bytes": summary["bytes"]},
        "histograms": {"segments per image": _histogram(per_image), "texts per segment": _histogram(per_segment),
                       "segment area (share of the image)": _histogram(area_frac, AREA_BINS),
                       "text sources": {"labels": list(text_sources), "counts": list(text_sources.values())},
                       "image sources": {"labels": list(summary["image_sources"]),
                                         "counts": list(summary["image_sources"].values())}},
    }
    (out / "data" / "index.js").write_bytes(_js("window.USE_BROWSE", data))
    for name in ("index.html", "app.js", "style.css"):
        shutil.copyfile(STATIC / name, out / name)
    if not (out / "search-index.js").exists():
        (out / "search-index.js").write_text("window.USE_SEARCH = null;\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("browser of %d samples (%d segments), %.1f MB: %s", len(samples), sum(per_image), size / 1e6,
             out / "index.html")
    return {"samples": len(samples), "segments": sum(per_image), "bytes": size, "path": out / "index.html"}
