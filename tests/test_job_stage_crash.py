"""A model stage whose process dies (segfault, CUDA OOM: here SIGKILL of itself) or hangs on one image:
Ray restarts the actor a bounded number of times, the batch is retried image by image, and only the
offending image becomes a failure of that stage; the job finishes with every other image written."""

from __future__ import annotations

import pytest
from job_helpers import write_coco

import shards
from pipeline.config import load_config
from pipeline.job import JobFailed, run_job
from shards import make_key


def _job(tmp_path, probe: str, *extra: str):
    paths = write_coco(tmp_path / "data", {f"{i}.png": (24, 20) for i in range(1, 7)}, captions=False)
    return load_config("demo", [
        "source.name=crash", f"source.images={paths['images']}", f"source.annotations={paths['annotations']}",
        "captioner.enabled=true", f"impl.captioner=job_probes:{probe}", "captioner.batch_size=3",
        "captioner.num_cpus=0.5", "read.batch_size=3", "ray.task_cpus=0.5", *extra])


def _check(out, summary, words: str):
    failures = {f["key"]: f for f in shards.read_failures(out).to_pylist()}
    written = {s.key for s in shards.iter_samples(out)}
    bad = make_key("crash", 3)
    assert set(failures) == {bad}, failures
    assert failures[bad]["stage"] == "captioner" and words in failures[bad]["error"], failures[bad]
    assert written == {make_key("crash", i) for i in (1, 2, 4, 5, 6)}
    assert (summary["written"], summary["failed"]) == (5, 1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stage_that_kills_its_process_fails_only_that_image(tmp_path, ray_local):
    out = tmp_path / "out"
    summary = run_job(_job(tmp_path, "KillProbe", "ray.max_restarts=3", "ray.max_task_retries=3"), out,
                      progress=False)
    _check(out, summary, "died with this image in hand 2 times")  # so Ray restarted the actor twice


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stage_that_hangs_on_one_image_times_out_and_fails_only_that_image(tmp_path, ray_local):
    out = tmp_path / "out"
    summary = run_job(_job(tmp_path, "HangProbe", "ray.batch_timeout_s=3"), out, progress=False)
    _check(out, summary, "timed out (over ray.batch_timeout_s=3 s)")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retries_are_finite_then_the_rows_are_recorded_as_lost(tmp_path, ray_local):
    """With no actor restart allowed the crashing batch cannot be retried (Ray Data's default would
    restart the actor for ever); its rows become failures and the job still ends."""
    paths = write_coco(tmp_path / "data", {f"{i}.png": (24, 20) for i in range(1, 4)}, captions=False)
    cfg = load_config("demo", [
        "source.name=crash", f"source.images={paths['images']}", f"source.annotations={paths['annotations']}",
        "captioner.enabled=true", "impl.captioner=job_probes:KillProbe", "captioner.batch_size=3",
        "captioner.num_cpus=0.5", "read.batch_size=3", "ray.task_cpus=0.5", "ray.max_restarts=0",
        "ray.max_task_retries=0"])
    out = tmp_path / "out"
    with pytest.raises(JobFailed, match="no input became a sample"):
        run_job(cfg, out, progress=False)
    failures = shards.read_failures(out).to_pylist()
    assert len(failures) == 3 and {f["stage"] for f in failures} == {"job"}
    assert all("lost" in f["error"] and "--retry-failed" in f["error"] for f in failures)
