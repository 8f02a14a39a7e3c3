"""Shards written by the Ray workers (issue 12 §1): content-named whole-shard commits, a re-executed
write task writes nothing twice, a regrouped one is de-duplicated at manifest time by a fixed rule,
size limits hold, and the job's output equals the single driver writer's."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
from job_helpers import shard_keys, start_ray, write_coco
from shards_util import make_sample

import shards
from pipeline.config import load_config
from pipeline.job import FAILPOINT_WRITE_EXIT, run_job
from shards.validate import validate
from shards.writer import _tmp, drop_duplicates, stats_path, write_shards


def _rows(indices, fail=()):
    return [{"key": f"test_{i}", "stage": "read", "error": "bad"} if i in fail else make_sample(i)[:2]
            for i in indices]


def test_a_reexecuted_write_finds_its_shards_committed(tmp_path):
    first = write_shards(tmp_path, "p", _rows(range(5), fail={2}), run="r1", max_samples=2)
    assert [s.samples for s in first] == [2, 2] and [len(s.failures) for s in first] == [0, 1]
    tars = shards.list_shards(tmp_path)
    assert sorted(t.name for t in tars) == sorted(s.shard for s in first)
    assert all(len(t.name) == len("p-") + 16 + len(".tar") for t in tars)
    before = {t.name: (t.stat().st_mtime_ns, stats_path(t).read_text()) for t in tars}
    again = write_shards(tmp_path, "p", _rows(range(5), fail={2}), run="r1", max_samples=2)  # Ray re-executes
    assert [s.shard for s in again] == [s.shard for s in first]
    assert {t.name: (t.stat().st_mtime_ns, stats_path(t).read_text()) for t in tars} == before  # not rewritten
    other_run = write_shards(tmp_path, "p", _rows([2]), run="r2", max_samples=2)  # a retry in a later run
    assert other_run[0].shard not in before and other_run[0].run == "r2"
    shards.build_manifest(tmp_path)
    assert sorted(r["key"] for r in shards.read_manifest(tmp_path).to_pylist()) == [f"test_{i}" for i in range(5)]
    assert shards.read_failures(tmp_path).num_rows == 0  # the later run's sample supersedes the failure
    assert validate(tmp_path) == []


def test_a_regrouped_reexecution_is_deduplicated_by_a_fixed_rule(tmp_path):
    first = write_shards(tmp_path, "p", _rows(range(6)), run="r1", max_samples=3)
    regrouped = write_shards(tmp_path, "p", _rows([4, 5, 6, 7]), run="r1", max_samples=4)  # test_4/5 twice
    assert sum(shard_keys(tmp_path).values()) == 10
    removed = drop_duplicates(tmp_path)
    assert removed == {regrouped[0].shard: ["test_4", "test_5"]}  # the shard committed first keeps them
    assert max(shard_keys(tmp_path).values()) == 1 and set(shard_keys(tmp_path)) == {f"test_{i}" for i in range(8)}
    kept = shards.read_stats(tmp_path / regrouped[0].shard)
    assert [k["key"] for k in kept.keys] == ["test_6", "test_7"] and kept.samples == 2
    assert kept.segments == sum(len(make_sample(i)[0].segments) for i in (6, 7))
    assert drop_duplicates(tmp_path) == {}  # idempotent
    shards.build_manifest(tmp_path)
    assert shards.read_manifest(tmp_path).num_rows == 8 and validate(tmp_path) == []
    assert first[0].shard in {r["shard"] for r in shards.read_manifest(tmp_path).to_pylist()}


def test_recover_commits_only_the_stats_that_match_the_tar(tmp_path):
    (s,) = write_shards(tmp_path, "p", _rows(range(2)), run="r1")
    tar = tmp_path / s.shard
    good = json.loads(stats_path(tar).read_text())
    stats_path(tar).unlink()  # a crash between the two renames of this attempt...
    _tmp(stats_path(tar), "aaaa").write_text(json.dumps(good))
    _tmp(stats_path(tar), "bbbb").write_text(json.dumps({**good, "sha256": "0" * 64}))  # ...and another attempt's
    _tmp(tar, "cccc").write_bytes(b"partial")
    shards.recover(tmp_path)
    assert json.loads(stats_path(tar).read_text()) == good and not list(tmp_path.glob(".*.tmp"))


def test_size_limits_hold_in_every_write(tmp_path):
    out = write_shards(tmp_path, "p", _rows(range(7)), run="r", max_samples=3)
    assert [s.samples for s in out] == [3, 3, 1]
    one = len(tarfile.open(tmp_path / out[0].shard).getmembers()) and (tmp_path / out[0].shard).stat().st_size
    by_bytes = write_shards(tmp_path / "b", "p", _rows(range(7)), run="r", max_samples=100, max_bytes=one // 2)
    assert all(s.samples <= 2 for s in by_bytes) and sum(s.samples for s in by_bytes) == 7
    with pytest.raises(ValueError, match="prefix"):
        write_shards(tmp_path, "../x", _rows([0]), run="r")


@pytest.fixture(scope="module")
def ray_failpoint(tmp_path_factory):
    """A local Ray whose workers exit once, right after a write task's first commit (the failpoint)."""
    import ray

    marker = tmp_path_factory.mktemp("failpoint") / "fired"
    os.environ[FAILPOINT_WRITE_EXIT] = str(marker)
    try:
        start_ray()
    finally:
        del os.environ[FAILPOINT_WRITE_EXIT]
    yield marker
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_writers_survive_reexecution_and_match_the_driver_writer(tmp_path, ray_failpoint):
    names = {f"{i}.png": (24 + i, 20) for i in range(11)}
    paths = write_coco(tmp_path / "data", {**names, "bad.png": None}, declared={"bad.png": (24, 20)})
    (paths["images"] / "bad.png").write_bytes(b"junk")

    def cfg(writers):
        return load_config("demo", ["source.name=w", f"source.images={paths['images']}",
                                    f"source.annotations={paths['annotations']}", f"source.captions={paths['captions']}",
                                    "ray.task_cpus=0.5", "shards.max_samples=4", f"shards.writers={writers}"])

    workers = run_job(cfg(2), tmp_path / "workers", progress=False)
    assert ray_failpoint.exists(), "the failpoint did not fire: no write task was re-executed"
    driver = run_job(cfg("driver"), tmp_path / "driver", progress=False)
    keys = shard_keys(tmp_path / "workers")
    assert max(keys.values()) == 1 and len(keys) == 11  # each key once, despite the re-executed task
    assert (workers["written"], workers["failed"], workers["failed_by_stage"]) == (11, 1, {"read": 1})
    assert all(shards.read_stats(t).samples <= 4 for t in shards.list_shards(tmp_path / "workers"))
    assert workers["shards"] == 3  # full shards: 12 rows in blocks of shards.max_samples=4
    assert validate(tmp_path / "workers") == []
    for k in ("written", "failed", "failed_by_stage", "segments", "texts"):
        assert workers[k] == driver[k], k
    samples = {d.name: {s.key: (s.meta.to_dict(), s.image_bytes) for s in shards.iter_samples(tmp_path / d.name)}
               for d in (tmp_path / "workers", tmp_path / "driver")}
    assert samples["workers"] == samples["driver"]  # the same samples, byte for byte
    assert shards.read_failures(tmp_path / "workers").to_pylist()[0]["key"] == \
        shards.read_failures(tmp_path / "driver").to_pylist()[0]["key"]
