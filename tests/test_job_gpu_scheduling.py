"""Fake GPUs on a 2-CPU local Ray: GPU stage actors get distinct CUDA_VISIBLE_DEVICES, the job
finishes without deadlock, and pools that can never all start are refused at start."""

from __future__ import annotations

import os

import pytest
from job_helpers import start_ray, write_coco

import shards
from pipeline.config import ConfigError, load_config
from pipeline.job import run_job


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    """Where DeviceProbe actors write ``<StageConfig>-<pid>.txt``; each test uses its own stages."""
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="module")
def ray_local(probe_dir):
    import ray

    os.environ["USE_PROBE_DIR"] = str(probe_dir)  # inherited by the workers started below
    start_ray(num_gpus=2)
    yield
    ray.shutdown()
    os.environ.pop("USE_PROBE_DIR")


def _actors(probe_dir, tags: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in sorted(probe_dir.iterdir()):
        tag = p.name.split("-")[0]
        if tag in tags:
            out.setdefault(tag, []).append(p.read_text())
    return out


def _cfg(paths, *overrides):
    return load_config("pipeline/configs/demo.yaml", [
        f"source.images={paths['images']}", f"source.annotations={paths['annotations']}", *overrides])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gpu_stage_actors_get_distinct_devices_without_deadlock(tmp_path, ray_local, probe_dir):
    paths = write_coco(tmp_path / "data", {f"im{i}.png": (24, 20) for i in range(12)})
    cfg = _cfg(paths, "impl.captioner=job_probes:DeviceProbe", "impl.segmenter=job_probes:DeviceProbe",
               "captioner.enabled=true", "captioner.num_gpus=1", "captioner.num_cpus=0.25",
               "captioner.batch_size=2", "segmenter.enabled=true", "segmenter.num_gpus=1",
               "segmenter.num_cpus=0.25", "segmenter.batch_size=3", "shards.max_samples=5")
    summary = run_job(cfg, tmp_path / "out", progress=False)
    assert (summary["written"], summary["failed"]) == (12, 0)
    pools = _actors(probe_dir, {"CaptionerConfig", "SegmenterConfig"})
    assert set(pools) == {"CaptionerConfig", "SegmenterConfig"}
    actors = {tag: devices[0] for tag, devices in pools.items()}
    assert sorted(d for devices in pools.values() for d in devices) == ["0", "1"]  # one fake GPU each
    for s in shards.iter_samples(tmp_path / "out"):  # every row went through both GPU actors
        seen = {c.text for c in s.meta.captions if c.source == "probe"}
        assert seen == {f"CaptionerConfig cuda={actors['CaptionerConfig']}",
                        f"SegmenterConfig cuda={actors['SegmenterConfig']}"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_actors_of_one_stage_get_both_gpus(tmp_path, ray_local, probe_dir):
    paths = write_coco(tmp_path / "data", {f"im{i}.png": (24, 20) for i in range(8)})
    cfg = _cfg(paths, "impl.grounder=job_probes:DeviceProbe", "grounder.enabled=true", "grounder.num_actors=2",
               "grounder.num_gpus=1", "grounder.num_cpus=0.25", "grounder.batch_size=1",
               "read.batch_size=1")  # else Ray Data may bundle all rows into one read output: one actor busy
    assert run_job(cfg, tmp_path / "out", progress=False)["written"] == 8
    assert sorted(_actors(probe_dir, {"GrounderConfig"})["GrounderConfig"]) == ["0", "1"]


def test_pools_that_cannot_start_are_refused(tmp_path, ray_local, monkeypatch):
    paths = write_coco(tmp_path / "data", {"a.png": (24, 20)})
    cfg = _cfg(paths, "impl.captioner=job_probes:DeviceProbe", "impl.segmenter=job_probes:DeviceProbe",
               "captioner.enabled=true", "captioner.num_gpus=1", "captioner.num_actors=2",
               "segmenter.enabled=true", "segmenter.num_gpus=1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="stages captioner, segmenter ask for 3 GPUs and the cluster has 2"):
        run_job(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # a refused start writes nothing
    cfg = _cfg(paths, "impl.captioner=job_probes:DeviceProbe", "captioner.enabled=true", "captioner.num_cpus=2")
    with pytest.raises(ConfigError, match=r"captioner 2 \(1 x num_cpus=2\)"):  # names the stage holding them
        run_job(cfg, tmp_path / "out2", progress=False)
