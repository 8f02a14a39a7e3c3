"""The curation job: source rows -> Ray Data stages -> write tasks in the workers -> manifest.

Ray Data is the engine (no scheduler of our own): the planned items become a dataset
(``from_items``), a CPU task reads each image once, every enabled model stage is a
``map_batches`` over a callable class on an ``ActorPoolStrategy`` pool (model loaded once per
actor, ``num_gpus``/``num_cpus``/batch size from config), mask NMS is a CPU task, and the last
step is a write task (``shards.writers`` at once, as img2dataset's workers and Ray Data's
datasinks do) that commits whole shards of ``shards.max_samples`` rows with
:func:`shards.writer.write_shards` and returns one small row per shard (its name, counts, keys).
The driver plans, counts those rows for progress, records rows the dataset lost, and builds the
manifest: no image byte passes through it. (``shards.writers=driver`` keeps the earlier single
writer in the driver, for comparison.)

Exactly-once: a key is done when it is in a committed shard or in a failure record of a committed
shard (``shards.done_keys``); a rerun after a crash filters those keys out of the inputs *first*
and redoes the rest. A write task that Ray re-executes (its worker died after a commit) gets the
same rows, so the same content-derived shard names, and finds them committed; one that grouped
its rows differently leaves duplicates, removed from the later shard when the manifest is built
(``shards.writer.drop_duplicates``). Failures whose cause is the environment (file missing,
permission) are not done: a rerun retries them, and ``--retry-failed`` retries every failure.

Failures never stop the job: each stage marks ``record.failure`` (see ``pipeline.record``), and a
stage that raises on a batch is retried row by row so only the rows that raise are failed
(``pipeline.retry``, the rule the model stages also follow around each forward). A stage
whose *process* dies (segfault, CUDA out of memory, ``os._exit``) or hangs past
``ray.batch_timeout_s`` is restarted by Ray a bounded number of times (``ray.max_restarts``,
``ray.max_task_retries``; Ray Data's defaults are unlimited); an :class:`AttemptLedger` actor
remembers which images were in hand, so the retried batch runs image by image and an image that
took the process down ``ray.image_attempts`` times becomes a failure of that stage alone. Rows lost
anyway (a batch out of retries) are recorded as failures at the end, so the job always finishes.

``output`` may be an ``s3://`` / ``gs://`` URL (:mod:`shards.storage`): the write tasks upload their
shards there themselves (tar first, stats object last: the commit), the job's small files are single
PUTs, and there is no ``.lock`` (object storage has no lock; one job per prefix is the user's rule).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from pipeline.config import STAGES, ConfigError, JobConfig, data_fields
from pipeline.nms import mask_nms
from pipeline.record import Record, records_of, with_records
from pipeline.retry import retry_per_item
from pipeline.sources import SourceError, make_source, read_item
from shards import storage
from shards.schema import SampleMeta
from shards.writer import is_shard_name, write_shards

log = logging.getLogger(__name__)

COLUMNS = ("key", "image", "record")
SUMMARY = "summary.json"
CONFIG_SNAPSHOT = "job_config.yaml"
LOCK = ".lock"
#: Test failpoint: a write task exits its process right after its first commit when this names a
#: file that does not exist yet (it creates it first), so Ray re-executes a task that already committed.
FAILPOINT_WRITE_EXIT = "USE_FAILPOINT_WRITE_EXIT"


class JobRefused(RuntimeError):
    """The job cannot start on this output directory (another job's shards, or a job running there)."""


class JobFailed(RuntimeError):
    """The job ran but produced no sample; the message says why (the summary is written)."""


class ModelsMissing(ConfigError):
    """Weights of one or more model stages are not on this machine; the message lists all of them."""


# -- the Ray Data transforms (run in workers) ---------------------------------------------------
def read_batch(batch: dict[str, np.ndarray], *, min_side: int, max_pixels: int, verify: str, max_bytes: int,
               follow_symlinks_outside: bool, exif: str = "reject") -> dict[str, np.ndarray]:
    """Planned items -> rows ``{key, image, record}``: read each image once, check it, fill the record."""
    n = len(batch["key"])
    rows = [read_item({k: batch[k][i] for k in batch}, min_side=min_side, max_pixels=max_pixels, verify=verify,
                      max_bytes=max_bytes, follow_symlinks_outside=follow_symlinks_outside, exif=exif)
            for i in range(n)]
    return {c: _objects([r[c] for r in rows]) for c in COLUMNS}


class AttemptLedger:
    """Which images a stage had in hand when its process died or hung, across actor restarts.

    A small Ray actor (``num_cpus=0``) on the driver's node: a stage marks keys before running them
    (``begin``) and clears them after (``end``); keys still marked when a retried batch arrives were
    in hand at a crash. ``note`` records why (a timeout) before the actor exits on purpose.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.reasons: dict[tuple[str, str], str] = {}

    def peek(self, stage: str, keys: list[str]) -> dict[str, tuple[int, str]]:
        return {k: (self.counts[(stage, k)], self.reasons.get((stage, k), "")) for k in keys
                if (stage, k) in self.counts}

    def begin(self, stage: str, keys: list[str]) -> None:
        for k in keys:
            self.counts[(stage, k)] = self.counts.get((stage, k), 0) + 1

    def end(self, stage: str, keys: list[str]) -> None:
        for k in keys:
            self.counts.pop((stage, k), None)
            self.reasons.pop((stage, k), None)

    def note(self, stage: str, keys: list[str], reason: str) -> None:
        for k in keys:
            self.reasons[(stage, k)] = reason


class StageRunner:
    """Ray actor around one model stage: loads it once, feeds it only the rows not yet failed.

    A stage is any ``Cls(config)`` with ``__call__(batch) -> batch`` on numpy batches of
    ``key/image/record``. If it raises on a batch, the batch is retried one row at a time and only
    the rows that raise become failures of this stage: one bad image never fails its neighbours,
    and a systematic bug still shows up as a failure on every row rather than a crashed job. With a
    ``ledger`` (see :class:`AttemptLedger`), a batch that was in hand when this actor's process died
    is run image by image, and an image in hand at ``image_attempts`` deaths is failed unrun.
    """

    def __init__(self, name: str, impl: type, config: Any, ledger: Any = None, image_attempts: int = 2,
                 timeout_s: float = 0.0):
        self.name = name
        self.stage = impl(config)
        self.ledger = ledger
        self.image_attempts = image_attempts
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{name}") if timeout_s > 0 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        todo = [i for i, r in enumerate(records) if r.failure is None]
        if not todo:
            return {c: batch[c] for c in COLUMNS}
        keys = {i: str(batch["key"][i]) for i in todo}
        prior = self._ledger("peek", list(keys.values())) or {}
        done: dict[str, tuple[Any, Record]] = {}

        def attempt(rows: list[int]) -> None:  # pipeline.retry's rule: the rows, then each row alone
            for _, out in retry_per_item(rows, lambda sub: self._run_rows(batch, sub, keys),
                                         lambda i, e: records[i].fail(self.name, e), what=f"stage {self.name}",
                                         describe=keys.__getitem__):
                done.update(out)

        if not prior:
            self._ledger("begin", list(keys.values()))
            attempt(todo)
            self._ledger("end", list(keys.values()))
        else:  # this batch was in hand when the process died: one image at a time
            for i in todo:
                n, reason = prior.get(keys[i], (0, ""))
                if n >= self.image_attempts:
                    records[i].fail(self.name, f"the stage's process {reason or 'died'} with this image in hand "
                                               f"{n} times (ray.image_attempts={self.image_attempts})")
                    self._ledger("end", [keys[i]])
                    continue
                self._ledger("begin", [keys[i]])
                attempt([i])
                self._ledger("end", [keys[i]])
        keys_out, images, out = [], [], []
        for i, rec in enumerate(records):
            key = str(batch["key"][i])
            image = batch["image"][i]
            if i in keys and rec.failure is None:
                if key in done:
                    image, rec = done[key]
                else:
                    rec.fail(self.name, "the stage returned no row for this image")
            keys_out.append(key)
            images.append(image)
            out.append(rec)
        return with_records({"key": _objects(keys_out), "image": _objects(images)}, out)

    def _run_rows(self, batch: dict[str, np.ndarray], rows: list[int],
                  keys: dict[int, str]) -> dict[str, tuple[Any, Record]]:
        """The stage on ``rows`` of ``batch``; its output rows by key."""
        sub = {c: _objects([batch[c][i] for i in rows]) for c in COLUMNS}
        return self._rows(self._run(sub, [keys[i] for i in rows]))

    def _run(self, sub: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
        """The stage on ``sub``; past ``timeout_s`` the hung call cannot be stopped from Python, so the
        process exits and Ray restarts the actor (the ledger says which images were in hand)."""
        if self._pool is None:
            return self.stage(sub)
        future = self._pool.submit(self.stage, sub)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            reason = f"timed out (over ray.batch_timeout_s={self.timeout_s:g} s)"
            self._ledger("note", keys, reason)
            log.error("stage %s %s on %d image(s); restarting its actor", self.name, reason, len(keys))
            os._exit(1)

    def _ledger(self, method: str, *args: Any) -> Any:
        if self.ledger is None:
            return None
        import ray

        return ray.get(getattr(self.ledger, method).remote(self.name, *args))

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
        rec.segments = [replace(s, id=i) for i, s in enumerate(segs)]
        if len(rec.segments) < min_segments:
            rec.fail("nms", f"{len(rec.segments)} segments, fewer than shards.min_segments={min_segments} "
                            f"(no annotation and no model stage gave a mask)")
    out = with_records(batch, records)
    return {c: out[c] for c in COLUMNS}


def write_batch(batch: dict[str, np.ndarray], *, output: str, prefix: str, max_samples: int, max_bytes: int,
                run: str) -> dict[str, np.ndarray]:
    """Rows -> committed shards (a write task in a worker); returns one row per shard for the driver:
    ``shard``, ``samples``, ``failed``, ``keys`` (every key it recorded, newline-joined) and
    ``captions_cut`` (LLaVA answers of its records cut at their token budget)."""
    records = records_of(batch)
    rows = [sample_row(str(k), image, rec) for k, image, rec in zip(batch["key"], batch["image"], records, strict=True)]
    cut = {str(k): rec.captions_cut for k, rec in zip(batch["key"], records, strict=True)}
    committed = write_shards(output, prefix, rows, run=run, max_samples=max_samples, max_bytes=max_bytes)
    _failpoint(FAILPOINT_WRITE_EXIT)
    return {"shard": _objects([s.shard for s in committed]),
            "samples": np.array([s.samples for s in committed], dtype=np.int64),
            "failed": np.array([len(s.failures) for s in committed], dtype=np.int64),
            "keys": _objects(["\n".join([*(k["key"] for k in s.keys), *(f["key"] for f in s.failures)])
                              for s in committed]),
            "captions_cut": np.array([sum(cut.get(k["key"], 0) for k in (*s.keys, *s.failures)) for s in committed],
                                     dtype=np.int64)}


def sample_row(key: str, image: Any, rec: Record) -> tuple[SampleMeta, bytes] | dict[str, Any]:
    """A record as a writer row: the typed sample, or a failure (the record's, or ``write`` when the
    sample would not pass the validator)."""
    if rec.failure is not None:
        return {"key": key, "stage": rec.failure.stage, "error": rec.failure.error, "retry": rec.failure.retry}
    try:
        meta = rec.to_sample_meta(key)
    except ValueError as e:  # shards.SchemaError
        return {"key": key, "stage": "write", "error": f"invalid sample: {e}"}
    return meta, bytes(image)


def _failpoint(name: str) -> None:
    marker = os.environ.get(name)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log.error("failpoint %s: exiting this worker after a commit", name)
    os._exit(1)


def _objects(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


# -- the driver ----------------------------------------------------------------------------------
def build_dataset(cfg: JobConfig, items: list[dict[str, str]], ledger: Any = None):
    """The lazy Ray Data pipeline over planned items (nothing runs until it is iterated).

    Retries are finite everywhere (Ray Data's defaults retry dead tasks and restart dead actors
    without limit, so one image that kills its worker would stop the job for good).

    Ray Data's per-operator resource reservation is off for this dataset (and those derived from
    it): its budget bookkeeping runs on every scheduling step in the driver and was half of the
    executor's CPU there, and reserving a share of the CPUs for each operator doubled the wall time
    of the 2-CPU benchmark (``benchmarks/bench_writers.py``). Backpressure stays with Ray Data's
    concurrency-cap and downstream-capacity policies; actor pools hold their own resources.
    """
    import ray

    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # no named form of the retry
    # arguments exists yet (Ray 2.60): max_retries / max_restarts / max_task_retries go through **ray_remote_args
    ds = ray.data.from_arrow(_item_blocks(items, cfg.read.batch_size))
    ds.context.op_resource_reservation_enabled = False
    r = cfg.read
    ds = ds.map_batches(read_batch, batch_format="numpy", batch_size=r.batch_size, num_cpus=cfg.ray.task_cpus,
                        max_retries=cfg.ray.task_retries,
                        fn_kwargs={"min_side": r.min_side, "max_pixels": r.max_pixels, "verify": r.verify,
                                   "max_bytes": r.max_bytes, "follow_symlinks_outside": r.follow_symlinks_outside,
                                   "exif": r.exif})
    for name in cfg.enabled_stages():
        stage = getattr(cfg, name)
        if "read" in type(stage).model_fields:  # decode under the read step's policy
            stage = stage.model_copy(update={"read": cfg.read.policy()})
        ds = ds.map_batches(
            StageRunner, batch_format="numpy", batch_size=stage.batch_size, num_gpus=stage.num_gpus or None,
            num_cpus=stage.num_cpus, compute=ray.data.ActorPoolStrategy(size=stage.num_actors),
            max_restarts=cfg.ray.max_restarts, max_task_retries=cfg.ray.max_task_retries,
            fn_constructor_kwargs={"name": name, "impl": cfg.stage_class(name), "config": stage, "ledger": ledger,
                                   "image_attempts": cfg.ray.image_attempts,
                                   "timeout_s": cfg.ray.batch_timeout_s})
    return ds.map_batches(finalize_batch, batch_format="numpy", batch_size=cfg.nms.batch_size,
                          num_cpus=cfg.ray.task_cpus, max_retries=cfg.ray.task_retries,
                          fn_kwargs={"nms": cfg.nms.enabled, "iou_threshold": cfg.nms.iou_threshold,
                                     "min_segments": cfg.shards.min_segments})


def _item_blocks(items: list[dict[str, str]], batch_size: int) -> list[pa.Table]:
    """The planned items as Arrow tables, one per input block (string columns built in one pass
    each: ``from_items`` costs tens of microseconds of driver CPU per item, this about one).

    Enough blocks for every actor to get work on small jobs, about one read batch each on big ones.
    """
    names = list(dict.fromkeys(k for it in items[:1] for k in it))
    table = pa.table({n: pa.array([it[n] for it in items], type=pa.string()) for n in names})
    blocks = max(1, min(len(items), max(math.ceil(len(items) / batch_size), 8), 10_000))
    bounds = np.linspace(0, len(items), blocks + 1).astype(int)
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def plan_items(cfg: JobConfig) -> list[dict[str, str]]:
    """Validate the annotations and list every input (raises :class:`SourceError` at start)."""
    items = list(make_source(cfg.source).plan())
    dupes = [k for k, n in Counter(it["key"] for it in items).items() if n > 1]
    if dupes:
        raise SourceError(f"{len(dupes)} inputs share a key, e.g. {dupes[:3]}; keys must be unique")
    if not items:
        raise SourceError(f"no input images: {cfg.source.images or cfg.source.annotations} lists none")
    return items


def _init_ray(cfg: JobConfig, verbose: bool = False) -> bool:
    """Join ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray; True when this call started it.

    Ray's start-up lines, Ray Data's execution lines and the workers' log streaming stay quiet
    unless ``verbose`` (failures are in ``failures.parquet``, not in logs).
    """
    import ray

    if ray.is_initialized():
        return False
    import ray.data  # noqa: F401 (configures the "ray.data" logger, whose console handler is quietened here)

    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("ray").setLevel(level)
    for handler in logging.getLogger("ray.data").handlers:  # its log file keeps everything
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(level)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    quiet = {"logging_level": level, "log_to_driver": verbose}
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False, **quiet)
    return True


def check_resources(cfg: JobConfig, cluster: dict[str, float], strict: bool) -> None:
    """Refuse (local) or warn about (cluster, may autoscale) stage pools that can never all start:
    Ray Data would wait for them forever. The message names the stages and the override that fixes it."""
    stages = {n: getattr(cfg, n) for n in cfg.enabled_stages()}
    gpu_stages = {n: s.num_actors * s.num_gpus for n, s in stages.items() if s.num_gpus > 0}
    gpus, have_gpus = sum(gpu_stages.values()), cluster.get("GPU", 0)
    cpus = {n: s.num_actors * s.num_cpus for n, s in stages.items()}
    problems = []
    if gpus > have_gpus + 1e-9:
        fix = " ".join(f"{n}.num_gpus=0" for n in gpu_stages)
        where = "this machine has none" if have_gpus == 0 else f"the cluster has {have_gpus:g}"
        problems.append(f"stages {', '.join(gpu_stages)} ask for {gpus:g} GPUs and {where}; to run them on CPU "
                        f"add {fix}" + (" (or lower their num_actors)" if have_gpus else ""))
    if sum(cpus.values()) + cfg.ray.task_cpus > cluster.get("CPU", 0) + 1e-9:
        holders = ", ".join(f"{n} {c:g} ({getattr(cfg, n).num_actors} x num_cpus={getattr(cfg, n).num_cpus:g})"
                            for n, c in sorted(cpus.items(), key=lambda kv: -kv[1]) if c > 0)
        problems.append(f"the stages' actor pools hold {sum(cpus.values()):g} CPUs ({holders}) and read/NMS tasks "
                        f"need ray.task_cpus={cfg.ray.task_cpus:g} more, the cluster has {cluster.get('CPU', 0):g}; "
                        f"lower <stage>.num_cpus or <stage>.num_actors")
    if problems and strict:
        raise ConfigError("; ".join(problems))
    for p in problems:
        log.warning("%s", p)


def check_models(cfg: JobConfig, config_name: str = "", overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Fail before any actor starts when a local job's weights are missing: one error listing every
    missing model and the exact command that fetches them for this config. On a joined cluster the
    nodes that load them check."""
    from pipeline.models import MODELS_DIR_ENV, ModelNotFoundError, resolve

    missing: dict[str, str] = {}
    for name in cfg.enabled_stages():
        stage = getattr(cfg, name)
        if name not in cfg.impl and getattr(stage, "model", None):
            try:
                resolve(stage.model, stage.models_dir)
            except ModelNotFoundError:
                missing[name] = stage.model
    if not missing:
        return
    local = {n: m for n, m in missing.items() if Path(m).expanduser().is_absolute() or m.startswith(".")}
    hub = {n: m for n, m in missing.items() if n not in local}
    parts = [f"model weights missing for {len(missing)} stage(s): "
             + ", ".join(f"{n} ({m})" for n, m in missing.items())]
    for n, m in local.items():
        parts.append(f"{n}.model {m} is a local path but not a model directory (config.json missing)")
    if hub:
        dirs = {getattr(cfg, n).models_dir or os.environ.get(MODELS_DIR_ENV) or "models" for n in hub}
        cache = str(Path(sorted(dirs)[0]).expanduser().resolve())
        model_overrides = [o for o in overrides if o.partition("=")[0].strip() in {f"{n}.model" for n in hub}]
        cmd = " ".join(["python -m pipeline models download", f"--config {config_name}" if config_name else "",
                        f"--cache {cache}", *model_overrides]).replace("  ", " ")
        rerun = " ".join(f"{n}.models_dir={cache}" for n in hub if getattr(cfg, n).models_dir != cache)
        parts.append(f"download them on a machine with internet: `{cmd}`"
                     + (f", then rerun with {rerun} (or {MODELS_DIR_ENV}={cache})" if rerun else ", then rerun"))
    raise ModelsMissing("; ".join(parts))


def _at(output: Path | str, name: str) -> Path | str:
    """A file of the output directory: a ``Path`` locally, a URL on object storage."""
    return storage.join(output, name) if isinstance(output, str) else output / name


def check_output(cfg: JobConfig, output: Path | str, config_name: str = "") -> None:
    """Refuse an output directory that holds another job's shards (compared by the data-affecting
    config fields, not the YAML text); a rerun of the same job resumes."""
    import shards

    snapshot = _at(output, CONFIG_SNAPSHOT)
    if not storage.exists(output) or (not storage.exists(snapshot) and not shards.list_shards(output)):
        return
    if not storage.exists(snapshot):
        raise JobRefused(f"{output} holds shards without {CONFIG_SNAPSHOT} (not written by this job); "
                         f"use --overwrite to replace them or choose another --output")
    try:
        old = JobConfig.model_validate(yaml.safe_load(storage.read_text(snapshot)))
    except Exception as e:
        raise JobRefused(f"{snapshot} is not a readable job config ({type(e).__name__}); use --overwrite to "
                         f"replace that job's output or choose another --output") from e
    a, b = data_fields(old), data_fields(cfg)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise JobRefused(f"{output} holds another job's shards: its config {snapshot} and this one "
                         f"({config_name or 'the given config'}) differ in {shown}{more}; use --overwrite to "
                         f"start afresh or choose another --output")


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``OUT/.lock`` for the whole job: a second job into the same directory
    is refused at once instead of interleaving shards (the lock goes with the process, even on SIGKILL)."""
    fd = os.open(output / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise JobRefused(f"{output} is in use by another curation job (pid {holder} holds {output / LOCK}); "
                             f"wait for it to finish or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def clear_output(output: Path | str) -> None:
    """``--overwrite``: remove what a job wrote (shards, stats, manifests, summary, config), nothing else."""
    import shards

    if isinstance(output, str):  # object storage: every shard object, committed or not, and the job's files
        fixed = {"manifest.parquet", "failures.parquet", SUMMARY, CONFIG_SNAPSHOT}
        for name in storage.listdir(output):
            if is_shard_name(name) or name.endswith(".stats.json") or name in fixed:
                storage.remove(storage.join(output, name))
        return
    for tar in shards.list_shards(output):
        tar.unlink()
    for pattern in ("*.stats.json", ".*.tmp", "manifest.parquet", "failures.parquet", SUMMARY, CONFIG_SNAPSHOT):
        for p in output.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def run_job(cfg: JobConfig, output: str | Path, *, progress: bool = True, overwrite: bool = False,
            retry_failed: bool = False, config_name: str = "", overrides: list[str] | tuple[str, ...] = (),
            verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) a job into ``output``; returns the summary also written to ``summary.json``.

    Everything that can refuse the job (annotations, weights, resources, another job's output) is
    checked before the first byte is written. Raises :class:`JobFailed` (after writing the summary)
    when no input became a sample.
    """
    import shards

    t0 = time.time()
    remote = storage.is_remote(output)
    try:
        storage.check_url(output, "--output")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if remote and cfg.shards.writers == "driver":
        raise ConfigError(f"--output {output}: shards.writers=driver writes local directories only; use write "
                          f"tasks (shards.writers=N) for object storage")
    output = str(output).rstrip("/") if remote else Path(output)
    items = plan_items(cfg)
    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not joined:
        check_models(cfg, config_name, overrides)
    if not overwrite:
        check_output(cfg, output, config_name)
    started = False
    with contextlib.ExitStack() as stack:
        if not remote and output.exists():  # refuse a second job before starting anything
            stack.enter_context(output_lock(output))
        try:
            if overwrite or _todo(items, output, retry_failed, finish_commits=False):
                started = _init_ray(cfg, verbose)
                import ray

                check_resources(cfg, ray.cluster_resources(), strict=not joined)  # a cluster may autoscale
            if not remote and not output.exists():  # the first write of the job, after every check passed
                output.mkdir(parents=True)
                stack.enter_context(output_lock(output))
            if overwrite:
                clear_output(output)
            else:
                check_output(cfg, output, config_name)  # again, now that no other job can write
            _snapshot_config(cfg, output)
            before = shards.failure_records(output)
            todo = _todo(items, output, retry_failed)
            retried = sum(1 for it in todo if it["key"] in before)
            log.info("%d inputs: %d already done, %d to process (%d retried)", len(items), len(items) - len(todo),
                     len(todo), retried)
            processed, captions_cut = _process(cfg, todo, output, progress, verbose) if todo else (0, 0)
            shards.build_manifest(output)
            summary = _summary(output, len(items), len(items) - len(todo), processed, retried, time.time() - t0,
                               captions_cut)
            _write_text(_at(output, SUMMARY), json.dumps(summary, indent=1))
        finally:
            if started:
                import ray

                ray.shutdown()
    if summary["written"] == 0:
        by_stage = ", ".join(f"{k} {v}" for k, v in summary["failed_by_stage"].items())
        raise JobFailed(f"no input became a sample: all {summary['failed']} failed ({by_stage}); "
                        f"see {_at(output, 'failures.parquet')}")
    return summary


def _todo(items: list[dict[str, str]], output: Path | str, retry_failed: bool, finish_commits: bool = True,
          ) -> list[dict[str, str]]:
    import shards

    if not storage.exists(output):
        return list(items)
    written, _ = shards.done_keys(output, finish_commits=finish_commits)
    failed = shards.failure_records(output, finish_commits=finish_commits)
    done = written | {k for k, f in failed.items() if not (retry_failed or f.get("retry"))}
    return [it for it in items if it["key"] not in done]


def _process(cfg: JobConfig, todo: list[dict[str, str]], output: Path | str, progress: bool, verbose: bool,
             ) -> tuple[int, int]:
    """Run the dataset over ``todo``, its write tasks committing the shards; rows the dataset lost
    become failures. Returns (inputs processed, LLaVA answers cut at their token budget)."""
    import ray
    from ray.data import DataContext
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.max_errored_blocks, ctx.print_on_execution_start)
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = -1  # a block out of retries is dropped (its rows recorded below), not fatal
    ctx.print_on_execution_start = verbose
    ledger = ray.remote(num_cpus=0)(AttemptLedger).remote() if cfg.enabled_stages() else None
    run = uuid.uuid4().hex[:12]  # one token per run: a re-executed write task names its shards alike
    sc = cfg.shards
    try:
        ds = build_dataset(cfg, todo, ledger)
        with logging_redirect_tqdm(), tqdm(total=len(todo), desc="curate", unit="img", disable=not progress) as bar:
            if sc.writers == "driver":
                seen, captions_cut = _drive_writer(cfg, ds, output, bar)
            else:
                # blocks of exactly max_samples rows (streaming, no shuffle): one full shard per write
                ds = ds.repartition(target_num_rows_per_block=sc.max_samples, strict=True)
                ds = ds.map_batches(write_batch, batch_format="numpy", batch_size=sc.max_samples,
                                    num_cpus=cfg.ray.task_cpus, max_retries=cfg.ray.task_retries,
                                    compute=ray.data.TaskPoolStrategy(size=sc.writers),
                                    fn_kwargs={"output": _location(output), "prefix": sc.prefix,
                                               "max_samples": sc.max_samples, "max_bytes": sc.max_bytes, "run": run})
                seen, captions_cut = set(), 0
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    captions_cut += int(batch["captions_cut"].sum())
                    for keys in batch["keys"]:
                        if keys:
                            got = keys.split("\n")
                            seen.update(got)
                            bar.update(len(got))
        lost = [it["key"] for it in todo if it["key"] not in seen]
        if lost:  # a write task out of retries may still have committed before its worker died
            written, failed = shards_done(output)
            lost = [k for k in lost if k not in written and k not in failed]
        if lost:
            error = (f"lost: its batch failed more than ray.max_task_retries={cfg.ray.max_task_retries} times (a "
                     f"worker kept dying); rerun with --retry-failed to try again")
            write_shards(output, sc.prefix, [{"key": k, "stage": "job", "error": error} for k in lost], run=run,
                         max_samples=sc.max_samples, max_bytes=sc.max_bytes)
            log.warning("%d inputs were lost by the dataset and recorded as failures", len(lost))
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks, ctx.print_on_execution_start = saved
        if ledger is not None:
            ray.kill(ledger)
    return len(todo), captions_cut


def _location(output: Path | str) -> str:
    """The output as the write tasks get it: an absolute path (workers have other working directories)
    or the URL (each worker uploads there itself, with its own credentials from its environment)."""
    return output if isinstance(output, str) else str(output.resolve())


def shards_done(output: Path | str) -> tuple[set[str], set[str]]:
    """Keys committed as samples and as failures this far (without touching temp files)."""
    import shards

    written, _ = shards.done_keys(output, finish_commits=False)
    return written, set(shards.failure_records(output, finish_commits=False))


def _drive_writer(cfg: JobConfig, ds: Any, output: Path, bar: Any) -> tuple[set[str], int]:
    """``shards.writers=driver``: every row through one :class:`shards.ShardWriter` in this process;
    returns the keys it recorded and the LLaVA answers of their records cut at the token budget."""
    import shards

    seen: set[str] = set()
    captions_cut = 0
    with shards.ShardWriter(output, prefix=cfg.shards.prefix, max_samples=cfg.shards.max_samples,
                            max_bytes=cfg.shards.max_bytes) as writer:
        for batch in ds.iter_batches(batch_size=cfg.write_batch_size, batch_format="numpy"):
            for key, image, rec in zip(batch["key"], batch["image"], records_of(batch), strict=True):
                key = str(key)
                if key in writer:  # a re-executed Ray task delivered this row again: the first copy stands
                    log.warning("%s arrived twice from the dataset; keeping the first", key)
                    continue
                row = sample_row(key, image, rec)
                if isinstance(row, dict):
                    writer.add_failure(row["key"], row["stage"], row["error"], retry=bool(row.get("retry")))
                else:
                    writer.write(*row)
                seen.add(key)
                captions_cut += rec.captions_cut
            bar.update(len(batch["key"]))
    return seen, captions_cut


def _snapshot_config(cfg: JobConfig, output: Path | str) -> None:
    """Keep the first run's config beside the shards; a same-data rerun (other pool or batch sizes)
    resumes without replacing it (``check_output`` refused a config with other data fields)."""
    path = _at(output, CONFIG_SNAPSHOT)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if not storage.exists(path):
        _write_text(path, text)
    elif storage.read_text(path) != text:
        log.info("%s kept: this run differs from it only in settings that do not change the data", path)


def _write_text(path: Path | str, text: str) -> None:
    """Atomic write with the usual umask permissions (one PUT on object storage)."""
    if isinstance(path, str):
        storage.write_text(path, text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _summary(output: Path | str, n_in: int, n_skipped: int, processed: int, retried: int, wall: float,
             captions_cut: int = 0) -> dict[str, Any]:
    import shards

    manifest = shards.read_manifest(output).to_pylist()
    failures = shards.read_failures(output).to_pylist()
    return {
        "images_in": n_in,
        "already_done": n_skipped,
        "processed_this_run": processed,
        "retried": retried,
        "written": len(manifest),
        "failed": len(failures),
        "failed_by_stage": dict(Counter(f["stage"] for f in failures)),
        "segments": int(sum(r["segments"] for r in manifest)),
        "texts": int(sum(r["texts"] for r in manifest)),
        "captions_cut": captions_cut,  # this run's LLaVA answers that hit captioner.max_new_tokens before EOS
        "shards": len(shards.list_shards(output)),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(processed / wall, 3) if wall > 0 else 0.0,
        "output": str(output),
    }


__all__ = ["STAGES", "AttemptLedger", "JobFailed", "JobRefused", "ModelsMissing", "StageRunner", "build_dataset",
           "check_models", "check_output", "check_resources", "finalize_batch", "output_lock", "plan_items",
           "read_batch", "run_job"]
