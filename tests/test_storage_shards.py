"""Shards and inputs on object storage (``shards.storage``), against a local S3 server (moto on 127.0.0.1).

The commit rule there: the tar object first, its stats object last; every reader takes only shards
whose stats object exists, and ``recover`` deletes what a writer killed mid-upload left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import boto3
import pytest
import yaml
from job_helpers import ROOT, worker_env
from storage_server import s3_server, upload_dir

import shards
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.job import JobRefused, check_output, clear_output, run_job
from pipeline.sources import make_source
from pipeline.sources.base import EnvironmentReadError, ReadError, read_file
from pipeline.sources.schemas import json_file
from shards import cli as shards_cli
from shards import storage
from shards.stats import summarize
from shards.validate import validate
from shards.writer import done_keys, recover, write_shards

PREFIX = "synth"


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as url:
        yield url


@pytest.fixture(scope="module")
def rows(synth_shards):
    """12 samples of the synthetic shards as writer rows."""
    return [(s.meta, s.image_bytes) for s in list(shards.iter_samples(synth_shards))[:12]]


def _objects(url: str) -> set[str]:
    return set(storage.listdir(url))


def test_shards_round_trip_through_a_bucket(bucket, rows, capsys):
    out = f"{bucket}/round-trip"
    failure = {"key": "synth_999", "stage": "read", "error": "image file not found", "retry": True}
    stats = write_shards(out, PREFIX, [*rows, failure], run="r1", max_samples=5)
    assert [s.samples for s in stats] == [5, 5, 2] and len(stats[-1].failures) == 1
    urls = shards.list_shards(out)
    assert urls == sorted(urls) and len(urls) == 3 and all(u.startswith(f"{out}/{PREFIX}-") for u in urls)
    got = {s.key: s.image_bytes for s in shards.iter_samples(out)}
    assert got == {m.key: b for m, b in rows}
    assert validate(out) == []
    summary = summarize(out)
    assert (summary["shards"], summary["images"], summary["failures"]) == (3, 12, 1)
    assert summary["bytes"] == sum(storage.size(u) for u in urls)
    written, failed = done_keys(out)
    assert written == set(got) and failed == {"synth_999"}
    shards.build_manifest(out)
    assert shards.read_manifest(out).num_rows == 12 and shards.read_failures(out).num_rows == 1
    assert {"manifest.parquet", "failures.parquet"} <= _objects(out)
    # the command line takes the URL too
    assert shards_cli.main(["validate", out, "--no-progress"]) == 0
    assert "OK: 3 shard(s) checked" in capsys.readouterr().out
    assert shards_cli.main(["stats", out]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 12
    # a re-executed write of the same rows finds its shards committed and uploads nothing
    before = {n: storage.size(storage.join(out, n)) for n in _objects(out)}
    again = write_shards(out, PREFIX, [*rows, failure], run="r1", max_samples=5)
    assert [s.sha256 for s in again] == [s.sha256 for s in stats]
    assert {n: storage.size(storage.join(out, n)) for n in _objects(out)} == before


def _kill_after_tar_upload(out: str, run: str) -> subprocess.CompletedProcess:
    """A writer process that dies (``os._exit``, no clean-up) the moment it starts the stats upload."""
    script = textwrap.dedent(f"""
        import os, s3fs, shards
        from shards.writer import write_shards
        real = s3fs.S3FileSystem.pipe_file
        def dying(self, path, *a, **k):
            if path.endswith(".stats.json"):
                os._exit(9)
            return real(self, path, *a, **k)
        s3fs.S3FileSystem.pipe_file = dying
        rows = [(s.meta, s.image_bytes) for s in shards.iter_samples({str(out + "-src")!r})]
        write_shards({out!r}, {PREFIX!r}, rows, run={run!r}, max_samples=100)
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **worker_env()},
                          capture_output=True, text=True, timeout=120)


def test_a_writer_killed_between_tar_and_stats_leaves_no_shard(bucket, rows):
    out = f"{bucket}/killed"
    write_shards(out + "-src", PREFIX, rows[:4], run="src", max_samples=100)
    proc = _kill_after_tar_upload(out, "first")
    assert proc.returncode == 9, proc.stderr[-2000:]
    left = _objects(out)
    assert len(left) == 1 and next(iter(left)).endswith(".tar")  # the tar went up first, then the writer died
    # no reader takes it
    assert shards.list_shards(out) == []
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        shards.shard_urls(out)
    assert done_keys(out, finish_commits=False) == (set(), set())
    assert summarize(out)["shards"] == 0
    assert [p.message for p in validate(out)] == [
        "no committed shards (a *.tar with its *.stats.json) under this prefix"]
    # the rerun (a new run token: other names) commits the samples; recover removes the orphan
    write_shards(out, PREFIX, rows[:4], run="second", max_samples=100)
    assert len(_objects(out)) == 3 and len(shards.list_shards(out)) == 1
    recover(out)
    assert len(_objects(out)) == 2 and validate(out) == []
    assert {s.key for s in shards.iter_samples(out)} == {m.key for m, _ in rows[:4]}


def test_an_unfinished_multipart_upload_is_invisible_and_aborted(bucket, rows):
    out = f"{bucket}/multipart"
    write_shards(out, PREFIX, rows[:3], run="r", max_samples=100)
    client = boto3.client("s3")  # the state a writer killed inside a multipart upload leaves
    name, key = f"{PREFIX}-00000000deadbeef.tar", "multipart/" + f"{PREFIX}-00000000deadbeef.tar"
    bucket_name = bucket.removeprefix("s3://")
    up = client.create_multipart_upload(Bucket=bucket_name, Key=key)
    client.upload_part(Bucket=bucket_name, Key=key, PartNumber=1, UploadId=up["UploadId"], Body=b"\0" * (5 << 20))
    assert name not in _objects(out) and len(shards.list_shards(out)) == 1
    assert len(list(shards.iter_samples(out))) == 3 and validate(out) == []
    recover(out)
    assert client.list_multipart_uploads(Bucket=bucket_name, Prefix="multipart/").get("Uploads", []) == []
    assert len(shards.list_shards(out)) == 1


def test_duplicates_dropped_on_a_bucket(bucket, rows):
    out = f"{bucket}/dupes"
    write_shards(out, PREFIX, rows[:4], run="a", max_samples=100)
    write_shards(out, PREFIX, rows[2:6], run="b", max_samples=100)  # a regrouped re-execution: 2 keys twice
    assert sorted(p.key for p in validate(out) if "key is also in" in p.message) == sorted(m.key for m, _ in rows[2:4])
    shards.build_manifest(out)
    keys = [s.key for s in shards.iter_samples(out)]
    assert sorted(keys) == sorted(m.key for m, _ in rows[:6]) and validate(out) == []
    assert shards.read_manifest(out).num_rows == 6


def test_images_and_annotations_from_a_bucket(bucket, synth_dir):
    data = f"{bucket}/inputs"
    upload_dir(synth_dir, data)
    images = f"{data}/images"
    one = (synth_dir / "images" / "synth_000000.png").read_bytes()
    assert read_file(images, "synth_000000.png", max_bytes=1 << 20) == one
    with pytest.raises(ReadError, match="larger than read.max_bytes=100"):
        read_file(images, "synth_000000.png", max_bytes=100)
    with pytest.raises(EnvironmentReadError, match="not found"):
        read_file(images, "nope.png", max_bytes=1 << 20)
    with pytest.raises(ReadError, match="leaves --images"):
        read_file(images, "../instances.json", max_bytes=1 << 20)
    with pytest.raises(ReadError, match="not a regular file"):
        read_file(data, "images", max_bytes=1 << 20)
    # annotation files are fetched, then checked and streamed as local ones are
    assert json_file(f"{data}/instances.json", "COCO instances").read_bytes() == \
        (synth_dir / "instances.json").read_bytes()
    with pytest.raises(ValueError, match=f"COCO instances file {data}/missing.json not found"):
        json_file(f"{data}/missing.json", "COCO instances")
    cfg = JobConfig.model_validate({"source": {"kind": "coco", "name": "synth", "images": images,
                                               "annotations": f"{data}/instances.json",
                                               "captions": f"{data}/captions.json"}})
    items = list(make_source(cfg.source).plan())
    assert len(items) == 64 and all(it["root"] == images for it in items)
    folder = JobConfig.model_validate({"source": {"kind": "folder", "name": "f", "images": images + "/"}})
    names = [it["path"] for it in make_source(folder.source).plan()]
    assert names == sorted(p.name for p in (synth_dir / "images").iterdir())


def test_unsupported_urls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="source.images ftp://host/x: unsupported URL scheme ftp://"):
        JobConfig.model_validate({"source": {"kind": "folder", "images": "ftp://host/x"}})
    cfg = load_config("pipeline/configs/demo.yaml", [f"source.images={tmp_path}"])
    with pytest.raises(ConfigError, match="--output http://host/out: unsupported URL scheme"):
        run_job(cfg, "http://host/out", progress=False)
    with pytest.raises(ConfigError, match="shards.writers=driver writes local directories only"):
        run_job(cfg.model_copy(update={"shards": cfg.shards.model_copy(update={"writers": "driver"})}),
                "s3://bucket/out", progress=False)


def test_another_jobs_prefix_is_refused_and_overwrite_clears_only_the_jobs_objects(bucket, rows, tmp_path):
    out = f"{bucket}/owned"
    cfg = load_config("pipeline/configs/demo.yaml", [f"source.images={bucket}/imgs"])
    write_shards(out, PREFIX, rows[:2], run="r", max_samples=100)
    with pytest.raises(JobRefused, match="holds shards without job_config.yaml"):
        check_output(cfg, out)
    storage.write_text(f"{out}/job_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json")))
    check_output(cfg, out)  # the same job resumes
    other = load_config("pipeline/configs/demo.yaml", [f"source.images={bucket}/other"])
    with pytest.raises(JobRefused, match=f"source.images: '{bucket}/imgs' there, '{bucket}/other' here"):
        check_output(other, out)
    storage.write_text(f"{out}/notes.txt", "not the job's")
    clear_output(out)
    assert _objects(out) == {"notes.txt"}
