"""The curation job: source rows -> Ray Data stages -> one driver-side shard writer.

Ray Data is the engine (no scheduler of our own): the planned items become a dataset
(``from_items``), a CPU task reads each image once, every enabled model stage is a
``map_batches`` over a callable class on an ``ActorPoolStrategy`` pool (model loaded once per
actor, ``num_gpus``/``num_cpus``/batch size from config), and mask NMS is a CPU task. The driver
streams ``iter_batches`` into a single :class:`shards.ShardWriter`.

Why a single writer: exactly-once. A key is done when it is in a committed shard or in a failure
record of a committed shard (``shards.done_keys``); a rerun after a crash filters those keys out
of the inputs *first* and redoes the rest, so every input lands exactly once without coordinating
several writers. The writer is cheap next to the model stages (tar append + an fsync per shard).

Failures never stop the job: each stage marks ``record.failure`` (see ``pipeline.record``), and a
stage that raises on a batch is retried row by row so only the rows that raise are failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import STAGES, ConfigError, JobConfig
from pipeline.nms import mask_nms
from pipeline.record import Record, records_of, with_records
from pipeline.sources import SourceError, make_source, read_item

log = logging.getLogger(__name__)

COLUMNS = ("key", "image", "record")
SUMMARY = "summary.json"
CONFIG_SNAPSHOT = "job_config.yaml"


# -- the Ray Data transforms (run in workers) ---------------------------------------------------
def read_batch(batch: dict[str, np.ndarray], *, min_side: int, max_pixels: int, verify: str) -> dict[str, np.ndarray]:
    """Planned items -> rows ``{key, image, record}``: read each image once, check it, fill the record."""
    n = len(batch["key"])
    rows = [read_item({k: batch[k][i] for k in batch}, min_side=min_side, max_pixels=max_pixels, verify=verify)
            for i in range(n)]
    return {c: _objects([r[c] for r in rows]) for c in COLUMNS}


class StageRunner:
    """Ray actor around one model stage: loads it once, feeds it only the rows not yet failed.

    A stage is any ``Cls(config)`` with ``__call__(batch) -> batch`` on numpy batches of
    ``key/image/record``. If it raises on a batch, the batch is retried one row at a time and only
    the rows that raise become failures of this stage: one bad image never fails its neighbours,
    and a systematic bug still shows up as a failure on every row rather than a crashed job.
    """

    def __init__(self, name: str, impl: type, config: Any):
        self.name = name
        self.stage = impl(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        todo = [i for i, r in enumerate(records) if r.failure is None]
        if not todo:
            return {c: batch[c] for c in COLUMNS}
        sub = {c: _objects([batch[c][i] for i in todo]) for c in COLUMNS}
        try:
            done = self._rows(self.stage(sub))
        except Exception:
            log.warning("stage %s failed on a batch of %d; retrying row by row:\n%s", self.name, len(todo),
                        traceback.format_exc(limit=3))
            done = {}
            for i in todo:
                one = {c: _objects([batch[c][i]]) for c in COLUMNS}
                try:
                    done.update(self._rows(self.stage(one)))
                except Exception as e:
                    records[i].fail(self.name, f"{type(e).__name__}: {e}")
        keys, images, out = [], [], []
        for i, rec in enumerate(records):
            key = str(batch["key"][i])
            image = batch["image"][i]
            if i in todo and rec.failure is None:
                if key in done:
                    image, rec = done[key]
                else:
                    rec.fail(self.name, "the stage returned no row for this image")
            keys.append(key)
            images.append(image)
            out.append(rec)
        return with_records({"key": _objects(keys), "image": _objects(images)}, out)

    @staticmethod
    def _rows(batch: dict[str, np.ndarray]) -> dict[str, tuple[Any, Record]]:
        return {str(k): (img, r) for k, img, r in zip(batch["key"], batch["image"], records_of(batch), strict=True)}


def finalize_batch(batch: dict[str, np.ndarray], *, nms: bool, iou_threshold: float,
                   min_segments: int) -> dict[str, np.ndarray]:
    """Mask NMS (texts of duplicates merged), segment ids renumbered, too-few-segments check."""
    records = records_of(batch)
    for rec in records:
        if rec.failure is not None:
            continue
        try:
            segs = mask_nms(rec.segments, iou_threshold) if nms else list(rec.segments)
        except Exception as e:
            rec.fail("nms", f"{type(e).__name__}: {e}")
            continue
        rec.segments = [{**s, "id": i} for i, s in enumerate(segs)]
        if len(rec.segments) < min_segments:
            rec.fail("nms", f"{len(rec.segments)} segments, fewer than shards.min_segments={min_segments} "
                            f"(no annotation and no model stage gave a mask)")
    out = with_records(batch, records)
    return {c: out[c] for c in COLUMNS}


def _objects(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


# -- the driver ----------------------------------------------------------------------------------
def build_dataset(cfg: JobConfig, items: list[dict[str, str]]):
    """The lazy Ray Data pipeline over planned items (nothing runs until it is iterated)."""
    import ray

    # enough blocks for every actor to get work on small jobs, about one read batch each on big ones
    blocks = max(1, min(len(items), max(math.ceil(len(items) / cfg.read.batch_size), 8), 10_000))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(read_batch, batch_format="numpy", batch_size=cfg.read.batch_size,
                        num_cpus=cfg.ray.task_cpus, fn_kwargs={"min_side": cfg.read.min_side,
                                                               "max_pixels": cfg.read.max_pixels,
                                                               "verify": cfg.read.verify})
    for name in cfg.enabled_stages():
        stage = getattr(cfg, name)
        if "max_pixels" in type(stage).model_fields:  # decode with the limit the read step applied
            stage = stage.model_copy(update={"max_pixels": cfg.read.max_pixels})
        ds = ds.map_batches(
            StageRunner, batch_format="numpy", batch_size=stage.batch_size, num_gpus=stage.num_gpus or None,
            num_cpus=stage.num_cpus, compute=ray.data.ActorPoolStrategy(size=stage.num_actors),
            fn_constructor_kwargs={"name": name, "impl": cfg.stage_class(name), "config": stage})
    return ds.map_batches(finalize_batch, batch_format="numpy", batch_size=cfg.nms.batch_size,
                          num_cpus=cfg.ray.task_cpus,
                          fn_kwargs={"nms": cfg.nms.enabled, "iou_threshold": cfg.nms.iou_threshold,
                                     "min_segments": cfg.shards.min_segments})


def plan_items(cfg: JobConfig) -> list[dict[str, str]]:
    """Validate the annotations and list every input (raises :class:`SourceError` at start)."""
    items = list(make_source(cfg.source).plan())
    dupes = [k for k, n in Counter(it["key"] for it in items).items() if n > 1]
    if dupes:
        raise SourceError(f"{len(dupes)} inputs share a key, e.g. {dupes[:3]}; keys must be unique")
    return items


def _init_ray(cfg: JobConfig) -> bool:
    """Join ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    return True


def check_resources(cfg: JobConfig, cluster: dict[str, float], strict: bool) -> None:
    """Refuse (local) or warn about (cluster, may autoscale) stage pools that can never all start:
    Ray Data would wait for them forever."""
    stages = [getattr(cfg, n) for n in cfg.enabled_stages()]
    gpus = sum(s.num_actors * s.num_gpus for s in stages)
    cpus = sum(s.num_actors * s.num_cpus for s in stages)
    problems = []
    if gpus > cluster.get("GPU", 0) + 1e-9:
        problems.append(f"the stages' actor pools need {gpus:g} GPUs, the cluster has {cluster.get('GPU', 0):g}")
    if cpus + cfg.ray.task_cpus > cluster.get("CPU", 0) + 1e-9:
        problems.append(f"the stages' actor pools hold {cpus:g} CPUs and read/NMS tasks need "
                        f"{cfg.ray.task_cpus:g} more, the cluster has {cluster.get('CPU', 0):g} "
                        f"(lower <stage>.num_cpus of GPU stages)")
    if problems and strict:
        raise ConfigError("; ".join(problems))
    for p in problems:
        log.warning("%s", p)


def check_models(cfg: JobConfig) -> None:
    """Fail before any actor starts when a local job's weights are missing (one clear error naming
    the model and the download command). On a joined cluster the nodes that load them check."""
    from pipeline.models import resolve

    for name in cfg.enabled_stages():
        stage = getattr(cfg, name)
        if name not in cfg.impl and getattr(stage, "model", None):
            resolve(stage.model, stage.models_dir)


def run_job(cfg: JobConfig, output: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a job into ``output``; returns the summary also written to ``summary.json``."""
    from tqdm import tqdm

    import shards
    from shards.schema import SampleMeta

    t0 = time.time()
    output = Path(output)
    items = plan_items(cfg)
    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not joined:
        check_models(cfg)
    output.mkdir(parents=True, exist_ok=True)
    _snapshot_config(cfg, output)
    written, failed = shards.done_keys(output)
    done = written | failed
    todo = [it for it in items if it["key"] not in done]
    log.info("%d inputs: %d already done, %d to process", len(items), len(items) - len(todo), len(todo))
    processed = 0
    if todo:
        import ray
        from ray.data import DataContext

        started = _init_ray(cfg)
        try:
            check_resources(cfg, ray.cluster_resources(), strict=not joined)  # a cluster may autoscale
            DataContext.get_current().enable_progress_bars = False
            ds = build_dataset(cfg, todo)
            bar = tqdm(total=len(todo), desc="curate", unit="img", disable=not progress)
            with shards.ShardWriter(output, prefix=cfg.shards.prefix, max_samples=cfg.shards.max_samples,
                                    max_bytes=cfg.shards.max_bytes) as writer:
                for batch in ds.iter_batches(batch_size=cfg.write_batch_size, batch_format="numpy"):
                    for key, image, rec in zip(batch["key"], batch["image"], records_of(batch), strict=True):
                        _write_one(writer, str(key), image, rec, SampleMeta)
                    processed += len(batch["key"])
                    bar.update(len(batch["key"]))
            bar.close()
        finally:
            if started:
                ray.shutdown()
    shards.build_manifest(output)
    summary = _summary(output, len(items), len(items) - len(todo), processed, time.time() - t0)
    (output / SUMMARY).write_text(json.dumps(summary, indent=1))
    log.info("summary: %s", json.dumps(summary))
    return summary


def _write_one(writer: Any, key: str, image: Any, rec: Record, meta_cls: Any) -> None:
    if key in writer:  # a re-executed Ray task delivered this row again: the first copy stands
        log.warning("%s arrived twice from the dataset; keeping the first", key)
        return
    if rec.failure is not None:
        writer.add_failure(key, rec.failure.stage, rec.failure.error)
        return
    try:
        meta = meta_cls.from_dict({
            "schema_version": 1, "key": key, "image_id": rec.image_id, "source": rec.source,
            "width": rec.width, "height": rec.height, "image_ext": rec.image_ext, "file_name": rec.file_name,
            "captions": rec.captions, "segments": rec.segments})
    except ValueError as e:  # shards.SchemaError: the sample would not pass the validator
        writer.add_failure(key, "write", f"invalid sample: {e}")
        return
    writer.write(meta, bytes(image))


def _snapshot_config(cfg: JobConfig, output: Path) -> None:
    """Keep the config beside the shards; warn when a resume runs with a different one."""
    path = output / CONFIG_SNAPSHOT
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path.exists() and path.read_text() != text:
        log.warning("%s differs from this run's config; samples already written keep the old settings", path)
    path.write_text(text)


def _summary(output: Path, n_in: int, n_skipped: int, processed: int, wall: float) -> dict[str, Any]:
    import shards

    manifest = shards.read_manifest(output).to_pylist()
    failures = shards.read_failures(output).to_pylist()
    return {
        "images_in": n_in,
        "already_done": n_skipped,
        "processed_this_run": processed,
        "written": len(manifest),
        "failed": len(failures),
        "failed_by_stage": dict(Counter(f["stage"] for f in failures)),
        "segments": int(sum(r["segments"] for r in manifest)),
        "texts": int(sum(r["texts"] for r in manifest)),
        "shards": len(shards.list_shards(output)),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(processed / wall, 3) if wall > 0 else 0.0,
        "output": str(output),
    }


__all__ = ["STAGES", "StageRunner", "build_dataset", "check_resources", "finalize_batch", "plan_items",
           "read_batch", "run_job"]
