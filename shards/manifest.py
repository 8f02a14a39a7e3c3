"""The dataset manifest: one parquet row per sample and one per failed input, built from the stats files.

The stats files are the source of truth (written atomically with each shard); the manifest is a
derived index for humans and tools, rebuilt whenever a job finishes or resumes. An input that failed
and was retried by a later run appears once: as a sample if the retry wrote it, else with its
latest failure.

On object storage (an ``s3://`` / ``gs://`` directory) the manifest is built from the committed
shards only (those whose stats object exists) and each parquet file is one PUT.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .writer import commit_order, drop_duplicates, recover

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
FAILURES = "failures.parquet"

_MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("segments", pa.int32()), ("texts", pa.int32()),
])
_FAILURE_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("stage", pa.string()),
                             ("error", pa.string())])


def build_manifest(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``manifest.parquet`` and ``failures.parquet`` for every committed shard in ``out_dir``.

    First the crash leftovers are finished (:func:`shards.writer.recover`) and a key that a
    re-executed write task committed twice is removed from the later shard
    (:func:`shards.writer.drop_duplicates`): only once no writer runs.
    """
    out_dir = str(out_dir) if storage.is_remote(out_dir) else Path(out_dir)
    recover(out_dir)
    drop_duplicates(out_dir)
    rows, failures = [], {}
    for tar, stats in commit_order(out_dir):
        if stats is None:  # not written by a shards writer (or copied without its stats): read the tar
            log.warning("%s has no stats file; its manifest rows are read from the tar", tar.name)
            rows.extend(_rows_from_tar(tar))
            continue
        rows.extend({"shard": stats.shard, **{k: row[k] for k in _MANIFEST_SCHEMA.names[1:]}} for row in stats.keys)
        for f in stats.failures:  # a rerun's record of a key supersedes an earlier failure (retried inputs)
            failures.pop(f["key"], None)
            failures[f["key"]] = {"shard": stats.shard, "key": f["key"], "stage": f["stage"], "error": f["error"]}
    written = {r["key"] for r in rows}
    failures = [f for k, f in failures.items() if k not in written]
    manifest = storage.join(out_dir, MANIFEST) if isinstance(out_dir, str) else out_dir / MANIFEST
    failed = storage.join(out_dir, FAILURES) if isinstance(out_dir, str) else out_dir / FAILURES
    _write_atomic(pa.Table.from_pylist(rows, schema=_MANIFEST_SCHEMA), manifest)
    _write_atomic(pa.Table.from_pylist(failures, schema=_FAILURE_SCHEMA), failed)
    return manifest, failed


def _rows_from_tar(tar: Path) -> list[dict]:
    from .reader import iter_samples  # webdataset (and torch) only when a shard lacks its stats

    return [{"shard": tar.name, "key": x.key, "image_id": x.meta.image_id, "source": x.meta.source,
             "width": x.meta.width, "height": x.meta.height, "segments": len(x.meta.segments),
             "texts": sum(len(seg.texts) for seg in x.meta.segments)}
            for x in iter_samples(tar, on_error="skip")]


def _write_atomic(table: pa.Table, path: Path | str) -> None:
    if storage.is_remote(path):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(path, buf.getvalue())
        return
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_manifest(out_dir: str | Path) -> pa.Table:
    return _read(out_dir, MANIFEST)


def read_failures(out_dir: str | Path) -> pa.Table:
    return _read(out_dir, FAILURES)


def _read(out_dir: str | Path, name: str) -> pa.Table:
    if storage.is_remote(out_dir):
        return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out_dir, name))))
    return pq.read_table(Path(out_dir) / name)
