"""The curation job and the trainer on object storage: images, annotations and output in a bucket of a
local S3 server (moto on 127.0.0.1), the Ray write tasks uploading the shards themselves.

One job of the 64 synthetic images, then: ``shards validate`` on the URL, a short training run read
from the bucket (equal losses to the same shards on disk), and the state a writer killed mid-upload
leaves (a tar without its stats object, an unfinished multipart upload): no reader takes it, and a
rerun of the same command finishes the job with every input exactly once.
"""

from __future__ import annotations

import json
from collections import Counter

import boto3
import pytest
import ray
from job_helpers import start_ray
from storage_server import s3_server, upload_dir
from train_helpers import DEMO, FAST, losses

import shards
from pipeline import cli as pipeline_cli
from shards import cli as shards_cli
from shards import storage
from shards.stats import summarize
from shards.writer import done_keys, read_stats
from trainer import cli as trainer_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(synth_dir):
    """The bucket with the synthetic dataset under ``data/`` and a finished job's output under ``out``."""
    with s3_server() as bucket:  # before Ray starts: its workers inherit the endpoint and credentials
        upload_dir(synth_dir, f"{bucket}/data")
        start_ray()
        try:
            yield bucket, f"{bucket}/out"
        finally:
            ray.shutdown()


def _curate(bucket: str, out: str) -> int:
    return pipeline_cli.main(["curate", "--config", "demo", "--images", f"{bucket}/data/images",
                              "--annotations", f"{bucket}/data/instances.json",
                              "--captions", f"{bucket}/data/captions.json", "--output", out, "--no-progress"])


def _finished(bucket: str, out: str) -> str:
    """The job's output (curated here when this test runs without the first one)."""
    if not storage.exists(f"{out}/summary.json"):
        assert _curate(bucket, out) == 0
    return out


def _keys(out: str) -> Counter:
    """Keys of every committed shard, samples and failures, counted."""
    return Counter(k for tar, st in shards.writer.commit_order(out)
                   for k in [*(r["key"] for r in st.keys), *(f["key"] for f in st.failures)])


def test_curation_into_a_bucket_then_validate(job, synth_dir, tmp_path, monkeypatch, capsys):
    bucket, out = job
    monkeypatch.chdir(tmp_path)  # nothing may land on local disk under the URL's name
    assert _curate(bucket, out) == 0
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert (summary["images_in"], summary["written"] + summary["failed"]) == (64, 64)
    assert summary["written"] >= 60 and summary["shards"] == 4 and summary["output"] == out
    assert list(tmp_path.iterdir()) == []
    assert {"job_config.yaml", "manifest.parquet", "failures.parquet", "summary.json"} <= set(storage.listdir(out))
    keys = _keys(out)
    assert len(keys) == 64 and set(keys.values()) == {1}
    originals = {str(int(p.stem.split("_")[1]) + 1): p.read_bytes() for p in (synth_dir / "images").iterdir()}
    samples = list(shards.iter_samples(out))
    assert len(samples) == summary["written"]
    assert all(s.image_bytes == originals[s.meta.image_id] for s in samples)  # the original bytes
    capsys.readouterr()
    assert shards_cli.main(["validate", out, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"OK: 4 shard(s) checked in {out}, no problems"


def test_training_reads_the_bucket(job, tmp_path):
    bucket, out = job
    _finished(bucket, out)
    local = tmp_path / "shards"
    local.mkdir()
    for url in shards.list_shards(out):  # the same shards on disk, for comparison
        for name in (storage.basename(url), storage.basename(url).removesuffix(".tar") + ".stats.json"):
            storage.download(storage.join(out, name), local)
    runs = {}
    for name, source in (("bucket", out), ("disk", str(local))):
        rc = trainer_cli.main(["train", "--config", str(DEMO), "--shards", source, "--output", str(tmp_path / name),
                               "--device", "cpu", *FAST, "steps=3"])
        assert rc == 0
        runs[name] = losses(tmp_path / name)
    assert len(runs["bucket"]) == 3 and runs["bucket"] == runs["disk"]


def test_inspect_and_browse_a_bucket(job, tmp_path, capsys):
    bucket, out = job
    _finished(bucket, out)
    assert shards_cli.main(["inspect", out, "--output", str(tmp_path / "png"), "--limit", "5", "--no-progress"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 5
    assert shards_cli.main(["browse", out, "--output", str(tmp_path / "site"), "--no-progress"]) == 0
    assert "wrote a browser of" in capsys.readouterr().out
    written = len(done_keys(out)[0])
    assert (tmp_path / "site" / "index.html").is_file()
    assert len(list((tmp_path / "site" / "images").glob("*.jpg"))) == written > 0


def test_feature_cache_of_bucket_shards_is_a_local_folder(job, tmp_path, capsys):
    """``cache-features`` and training from the cache on shards in a bucket: the cache goes to a local
    folder that must be named (the default, beside the shards, is not a folder here)."""
    bucket, out = job
    _finished(bucket, out)
    common = ["--config", str(DEMO), "--shards", out, "--device", "cpu"]
    assert trainer_cli.main(["cache-features", *common]) == 2
    assert "is in object storage and the feature cache is a local folder" in capsys.readouterr().err
    cache = tmp_path / "cache"
    assert trainer_cli.main(["cache-features", *common, "--output", str(cache)]) == 0
    assert sorted(p.name for p in cache.glob("*.features.safetensors")) == sorted(
        storage.basename(u).removesuffix(".tar") + ".features.safetensors" for u in shards.list_shards(out))
    assert trainer_cli.main(["train", *common, "--output", str(tmp_path / "run"), *FAST, "steps=2",
                             "use_feature_cache=true"]) == 2  # no cache_dir: refused before anything is written
    assert not (tmp_path / "run").exists()
    assert trainer_cli.main(["train", *common, "--output", str(tmp_path / "run"), *FAST, "steps=2",
                             "use_feature_cache=true", f"cache_dir={cache}"]) == 0
    assert len(losses(tmp_path / "run")) == 2


def test_a_writer_killed_mid_upload_then_a_rerun_finishes(job, capsys):
    bucket, out = job
    bucket_name = bucket.removeprefix("s3://")
    _finished(bucket, out)
    tars = shards.list_shards(out)
    # (1) a writer killed after its tar upload and before its stats upload: the tar without its stats object
    cut = tars[1]
    lost = {k["key"] for k in read_stats(cut).keys} | {f["key"] for f in read_stats(cut).failures}
    storage.remove(shards.writer.stats_path(cut))
    # (2) a writer killed inside a multipart upload: parts, no object
    client = boto3.client("s3")
    key = "out/synth-0123456789abcdef.tar"
    up = client.create_multipart_upload(Bucket=bucket_name, Key=key)
    client.upload_part(Bucket=bucket_name, Key=key, PartNumber=1, UploadId=up["UploadId"], Body=b"\0" * (5 << 20))

    # no reader takes either
    assert cut not in shards.list_shards(out) and len(shards.list_shards(out)) == 3
    written, failed = done_keys(out, finish_commits=False)
    assert not lost & (written | failed) and len(written | failed) == 64 - len(lost)
    assert {s.key for s in shards.iter_samples(out)}.isdisjoint(lost)
    assert summarize(out)["shards"] == 3
    capsys.readouterr()
    assert shards_cli.main(["validate", out, "--no-progress"]) == 0

    # the rerun redoes exactly the lost inputs and removes what the dead writers left
    assert _curate(bucket, out) == 0
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert (summary["already_done"], summary["processed_this_run"]) == (64 - len(lost), len(lost))
    keys = _keys(out)
    assert len(keys) == 64 and set(keys.values()) == {1}
    assert storage.basename(cut) not in storage.listdir(out)  # the orphan tar is gone
    assert client.list_multipart_uploads(Bucket=bucket_name, Prefix="out/").get("Uploads", []) == []
    assert shards.read_manifest(out).num_rows + shards.read_failures(out).num_rows == 64
    assert shards_cli.main(["validate", out, "--no-progress"]) == 0
