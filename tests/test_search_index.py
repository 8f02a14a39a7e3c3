"""Segment search on the synthetic dataset with the model of the trainer's learning test.

- a class-name query finds segments of that class (precision@5 over the six classes);
- the contact sheet, hits.json and image-as-query (--segment) work through the CLI;
- an index built in two resumed halves (or after a crash between a part's two files) is the same
  files as one built in one go, for the exact and for the IVF search;
- corrupt, truncated, unfinished, foreign and other-model indexes give one clear error.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.cli import main as eval_main
from evaluation.search import store as store_mod
from evaluation.search.build import build_index
from evaluation.search.config import IndexConfig
from evaluation.search.query import SegmentIndex, TextQuery
from evaluation.search.store import IndexFormatError
from pipeline.synth import CLASSES
from shards import iter_samples
from shards.browse.site import build_site

FILES = ("index.json", "vectors.npy", "rows.parquet")


@pytest.fixture(scope="module")
def val_index(synth_model_dir, synth_val_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search") / "index"
    assert eval_main(["index", "--checkpoint", str(synth_model_dir), "--shards", str(synth_val_shards),
                      "--output", str(out), "-q"]) == 0
    return out


def _class_of(index: SegmentIndex, hit) -> str:
    return hit.texts[0]["text"]


def test_class_query_precision_at_5(val_index, synth_model_dir, synth_val_shards):
    index = SegmentIndex(val_index)
    n_segments = sum(len(s.meta.segments) for s in iter_samples(synth_val_shards))
    assert len(index) == n_segments and index.kind == "flat"
    vec = np.asarray(index.vectors, dtype=np.float32)
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=2e-3)
    query = TextQuery(index)
    precision = {}
    for name in CLASSES:
        hits = query(name, k=5)
        assert len(hits) == 5 and hits[0].score >= hits[-1].score
        precision[name] = sum(_class_of(index, h) == name for h in hits) / 5
    print("precision@5 per class:", precision)
    assert np.mean(list(precision.values())) >= 0.8, precision
    assert min(precision.values()) >= 0.6, precision


def test_query_cli_writes_sheet_hits_and_segment_query(val_index, tmp_path, capsys):
    name = CLASSES[0]
    out = tmp_path / "q"
    assert eval_main(["query", str(val_index), name, "--top-k", "5", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].split()[0] == "1"
    doc = json.loads((out / "hits.json").read_text())
    assert doc["query"]["text"] == name and [h["rank"] for h in doc["hits"]] == [1, 2, 3, 4, 5]
    assert all({"score", "key", "segment_id", "texts", "bbox"} <= set(h) for h in doc["hits"])
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 5 * 200 and sheet.height > 200
    # the tiles are pictures, not blank frames
    assert np.asarray(sheet.convert("L")).std() > 20
    first = doc["hits"][0]
    assert eval_main(["query", str(val_index), "--segment", f"{first['key']}:{first['segment_id']}",
                      "--top-k", "3", "--json"]) == 0
    seg = json.loads(capsys.readouterr().out)
    assert len(seg["hits"]) == 3
    assert all((h["key"], h["segment_id"]) != (first["key"], first["segment_id"]) for h in seg["hits"])
    assert seg["hits"][0]["texts"][0]["text"] == first["texts"][0]["text"]


def test_query_errors_are_one_line(val_index, tmp_path, capsys):
    assert eval_main(["query", str(val_index), "--segment", "nokey:3"]) == 2
    assert "no segment nokey:3" in capsys.readouterr().err
    assert eval_main(["query", str(tmp_path / "missing"), "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such index directory" in err and "\n" not in err


def _files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in (*FILES, "ivf.faiss") if (root / name).exists()}


@pytest.mark.parametrize("flat_max", [100_000, 0], ids=["flat", "ivf"])
def test_two_resumed_halves_equal_one_build(synth_model_dir, synth_shards, tmp_path, flat_max, monkeypatch):
    cfg = IndexConfig.load(None, [f"flat_max={flat_max}", "ivf.nlist=8", "ivf.nprobe=8"])
    whole = build_index(synth_model_dir, synth_shards, tmp_path / "whole", cfg, progress=False)
    assert whole["done"] and whole["index"]["search"]["kind"] == ("flat" if flat_max else "ivf")

    half = build_index(synth_model_dir, synth_shards, tmp_path / "halves", cfg, limit_shards=2, progress=False)
    assert not half["done"] and half["pending"] == 3
    with pytest.raises(IndexFormatError, match="unfinished index build"):
        SegmentIndex(tmp_path / "halves")
    # the second half dies between a part's vectors and its rows (the commit point) ...
    real = store_mod.IndexStore.commit_part
    calls = []

    def crash_on_second(self, part, fingerprint):
        calls.append(part.shard)
        if len(calls) == 2:
            store_mod.atomic_write(self.parts / f"{part.stem}.npy", b"half written")
            raise KeyboardInterrupt
        real(self, part, fingerprint)

    monkeypatch.setattr(store_mod.IndexStore, "commit_part", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_index(synth_model_dir, synth_shards, tmp_path / "halves", cfg, progress=False)
    monkeypatch.setattr(store_mod.IndexStore, "commit_part", real)
    # ... and the rerun embeds exactly the shards without a committed part
    rest = build_index(synth_model_dir, synth_shards, tmp_path / "halves", cfg, progress=False)
    assert rest["done"] and rest["embedded"] == 2
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "halves")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    again = build_index(synth_model_dir, synth_shards, tmp_path / "halves", cfg, progress=False)
    assert again["embedded"] == 0 and _files(tmp_path / "halves") == a


def test_ivf_search_at_full_probe_equals_exact(synth_model_dir, synth_shards, tmp_path):
    cfg = IndexConfig.load(None, ["flat_max=0", "ivf.nlist=8", "ivf.nprobe=8"])
    build_index(synth_model_dir, synth_shards, tmp_path / "ivf", cfg, progress=False)
    index = SegmentIndex(tmp_path / "ivf")
    q = np.asarray(index.vectors[:7], dtype=np.float32)
    s_ann, i_ann = index.search_vectors(q, 5)
    s_ex, i_ex = index.search_vectors(q, 5, exact=True)
    np.testing.assert_allclose(s_ann, s_ex, atol=1e-5)
    assert (i_ann[:, 0] == np.arange(7)).all()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_foreign_and_unfinished_indexes(val_index, synth_model_dir, synth_val_shards, tmp_path):
    bad = _copy(val_index, tmp_path / "flip")
    data = bytearray((bad / "vectors.npy").read_bytes())
    data[-5] ^= 0xFF
    (bad / "vectors.npy").write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=r"vectors.npy: content does not match its sha256.*corrupt"):
        SegmentIndex(bad)

    cut = _copy(val_index, tmp_path / "cut")
    (cut / "rows.parquet").write_bytes((cut / "rows.parquet").read_bytes()[:100])
    with pytest.raises(IndexFormatError, match=r"rows.parquet: 100 bytes.*truncated"):
        SegmentIndex(cut)

    garbled = _copy(val_index, tmp_path / "garbled")
    (garbled / "index.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="index.json: unreadable"):
        SegmentIndex(garbled)

    foreign = _copy(val_index, tmp_path / "foreign")
    doc = json.loads((foreign / "index.json").read_text())
    (foreign / "index.json").write_text(json.dumps({**doc, "format": "some-other-index"}))
    with pytest.raises(IndexFormatError, match="not a USE segment index file"):
        SegmentIndex(foreign)
    (foreign / "index.json").write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99"):
        SegmentIndex(foreign)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(IndexFormatError, match="not a USE segment index"):
        SegmentIndex(plain)
    with pytest.raises(IndexFormatError, match="not empty and not a USE segment index"):
        build_index(synth_model_dir, synth_val_shards, plain, progress=False)
    assert (plain / "notes.txt").read_text() == "mine"

    other = _copy(synth_model_dir, tmp_path / "other_model")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg, indent=4))  # same model, other bytes: another fingerprint
    with pytest.raises(IndexFormatError, match="holds an index of another model"):
        build_index(other, synth_val_shards, _copy(val_index, tmp_path / "resume_other"), progress=False)
    with pytest.raises(IndexFormatError, match="not the model"):
        TextQuery(SegmentIndex(val_index), checkpoint=str(other))
    # the CLI says it in one line and exits 2
    assert eval_main(["query", str(bad), "circle"]) == 2


@pytest.mark.slow
def test_ray_actors_build_the_same_index(synth_model_dir, synth_val_shards, val_index, tmp_path):
    cfg = IndexConfig.load(None, ["ray.mode=ray", "ray.num_actors=1", "ray.local_num_cpus=2"])
    res = build_index(synth_model_dir, synth_val_shards, tmp_path / "ray", cfg, progress=False)
    assert res["done"] and res["embedded"] == 3
    ray_index, local = SegmentIndex(tmp_path / "ray"), SegmentIndex(val_index)
    assert ray_index.rows.equals(local.rows)  # same rows in the same (shard-name) order
    np.testing.assert_allclose(np.asarray(ray_index.vectors, np.float32), np.asarray(local.vectors, np.float32),
                               atol=2e-3)  # float16 of the same float32 math (thread counts may differ)


def test_html_export_for_the_browser(val_index, synth_val_shards, tmp_path):
    site = tmp_path / "site"
    build_site(synth_val_shards, site)
    assert (site / "search-index.js").read_text().strip() == "window.USE_SEARCH = null;"
    assert eval_main(["query", str(val_index), "--html", str(site)]) == 0
    text = (site / "search-index.js").read_text()
    doc = json.loads(text.removeprefix("window.USE_SEARCH = ").rstrip().rstrip(";"))
    index = SegmentIndex(val_index)
    assert len(doc["segments"]) == len(index) and set(CLASSES) <= set(doc["texts"])
    vec = np.frombuffer(base64.b64decode(doc["vectors"]), "<f2").reshape(len(index), doc["dim"])
    assert np.array_equal(vec, np.asarray(index.vectors))
    build_site(synth_val_shards, site)  # a rebuild keeps the exported query data
    assert (site / "search-index.js").read_text() == text
    assert eval_main(["query", str(val_index), "--html", str(tmp_path / "nosite")]) == 2
