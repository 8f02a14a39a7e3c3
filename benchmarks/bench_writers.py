"""Curation job: shards written by Ray write tasks against the single writer in the driver (issue 12 §1).

The annotation path of the COCO val2017 sample (``../shared/data``; the synthetic dataset without
it), its 40 images listed ``COPIES`` times under new image ids (real COCO polygons and JPEGs, a job
big enough that per-image costs show), run as a whole job on a local Ray already started:
``shards.writers=driver`` (every image through the driver) against ``shards.writers=1`` and ``2``
(write tasks in the workers commit whole shards; the driver counts what they return). Modes run
interleaved, ``ROUNDS`` times after one warm-up round, medians.

Driver CPU (``time.process_time`` of this process around ``run_job``) is split three ways, by
wrapping the job's own functions: planning (``plan_items``: annotation parsing and checks, the same
in every mode), the data path's main thread (``time.thread_time`` around ``_process``: receiving,
checking and writing rows in driver mode; counting returned rows with write tasks), and the rest
(Ray Data's streaming executor thread, which schedules ~10 times a second whatever the mode, block
fetch threads, the manifest). Images/s is inputs over the job's wall time.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import Entry, Section, entry_table, machine
from benchmarks.data import _coco_files

COPIES = int(os.environ.get("USE_BENCH_WRITER_COPIES", "15"))
ROUNDS = 2
MODES = ("driver", 1, 2)
TARGET = 20.0


def replicated_coco(tmp: Path, copies: int) -> tuple[str, dict[str, str], int]:
    """The sample's instances/captions JSON with every image listed ``copies`` times (new ids, same file)."""
    name, images, inst_path, caps_path = _coco_files(tmp)
    inst = json.loads(Path(inst_path).read_text())
    step = max(im["id"] for im in inst["images"]) + 1
    out = {"images": str(images)}
    for key, path in (("annotations", inst_path), ("captions", caps_path)):
        if path is None:
            continue
        data = json.loads(Path(path).read_text())
        data["images"] = [{**im, "id": im["id"] + c * step} for c in range(copies) for im in data["images"]]
        data["annotations"] = [{**a, "id": a["id"] + c * step * 1000, "image_id": a["image_id"] + c * step}
                               for c in range(copies) for a in data["annotations"]]
        out[key] = str(tmp / f"{key}.json")
        Path(out[key]).write_text(json.dumps(data))
    return f"{name} x{copies}", out, len(inst["images"]) * copies


def _timed_job(cfg, out: Path) -> dict[str, float]:
    """One ``run_job`` with its driver CPU split into planning, the data path's main thread and the rest."""
    from pipeline import job

    spent = {"plan": 0.0, "main": 0.0}
    plan, process = job.plan_items, job._process

    def timed_plan(*a, **k):
        t = time.process_time()
        try:
            return plan(*a, **k)
        finally:
            spent["plan"] += time.process_time() - t

    def timed_process(*a, **k):
        t = time.thread_time()
        try:
            return process(*a, **k)
        finally:
            spent["main"] += time.thread_time() - t

    job.plan_items, job._process = timed_plan, timed_process
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        summary = job.run_job(cfg, out, progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        job.plan_items, job._process = plan, process
    return {"cpu": cpu, "wall": wall, **spent, "written": summary["written"], "shards": summary["shards"]}


def bench(tmp: Path) -> tuple[str, int, dict[str, list[dict[str, float]]]]:
    import ray

    from pipeline.config import JobConfig, SourceConfig

    name, paths, n = replicated_coco(tmp, COPIES)
    src = SourceConfig(kind="coco", **paths)
    runs: dict[str, list[dict[str, float]]] = {str(m): [] for m in MODES}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    try:
        for r in range(ROUNDS + 1):  # round 0 warms workers and imports
            for mode in MODES:
                cfg = JobConfig(source=src, shards={"max_samples": 100, "writers": mode},
                                read={"batch_size": 32}, nms={"batch_size": 32})
                res = _timed_job(cfg, tmp / f"out-{r}-{mode}")
                assert res["written"] > 0
                if r:
                    runs[str(mode)].append(res)
    finally:
        ray.shutdown()
    return name, n, runs


def run() -> Section:
    with tempfile.TemporaryDirectory() as d:
        name, n, runs = bench(Path(d))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("cpu", "wall", "plan", "main")}
           for m, rs in runs.items()}
    per = {m: {k: v / n * 1000 for k, v in x.items() if k != "wall"} for m, x in med.items()}
    rate = {m: n / x["wall"] for m, x in med.items()}
    d, w2 = per["driver"], per["2"]
    entries = [
        Entry.cost("writers-driver-cpu-per-image", d["cpu"], w2["cpu"], "ms/image", TARGET,
                   f"{name}, whole job, driver process CPU: single driver writer against 2 write tasks "
                   f"(planning {d['plan']:.3f} / {w2['plan']:.3f} ms and Ray Data's executor are in both)"),
        Entry.cost("writers-driver-data-path-cpu-per-image", d["main"], w2["main"], "ms/image", TARGET,
                   f"{name}, the driver's main thread during the data path: receive + check + write every "
                   f"row, against counting the rows the write tasks return"),
        Entry.rate("writers-images-per-s", rate["1"], rate["2"], "images/s", None,
                   f"{name}, whole job on {os.cpu_count()} CPUs: 1 write task (baseline) against 2; "
                   f"the driver writer did {rate['driver']:.1f} images/s"),
    ]
    rows = ["| shards.writers | images/s | driver CPU ms/image | planning | data path (main thread) | rest |",
            "|---|---:|---:|---:|---:|---:|"]
    for m in runs:
        p = per[m]
        rows.append(f"| {m} | {rate[m]:.1f} | {p['cpu']:.3f} | {p['plan']:.3f} | {p['main']:.4f} | "
                    f"{p['cpu'] - p['plan'] - p['main']:.3f} |")
    md = "\n".join([
        "## Shards written by the workers (`benchmarks/bench_writers.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_writers`).", "",
        *entry_table(entries), "",
        f"Annotation-path job on {name} ({n} inputs), local Ray on {os.cpu_count()} CPUs, shards of 100, medians "
        f"of {ROUNDS} interleaved rounds after a warm-up round. Driver CPU split: planning (`plan_items`), the "
        "main thread during the data path (`_process`), and the rest of the process (Ray Data's streaming "
        "executor thread, block fetch threads, manifest).", "", *rows, "",
        f"Machine: {machine().describe()}.",
    ])
    return Section(md, entries)
