"""Kill the CLI driver with SIGKILL after some shards are committed, rerun the same command, and
every input is then in exactly one shard or in the failure records: never both, twice, or missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from job_helpers import ROOT, kill_marked, shard_keys, worker_env

import shards
from shards import make_key


def _command(data, out) -> list[str]:
    return [sys.executable, "-m", "pipeline", "curate", "--config", "pipeline/configs/demo.yaml",
            "--images", str(data / "images"), "--annotations", str(data / "instances.json"),
            "--captions", str(data / "captions.json"), "--output", str(out), "--no-progress",
            "impl.captioner=job_probes:SlowProbe", "captioner.enabled=true", "captioner.batch_size=2",
            "captioner.num_cpus=0.5", "shards.max_samples=2", "read.batch_size=2", "ray.num_cpus=2"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_mid_run_then_rerun_gives_exactly_once(synth_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("semantic"))
    inst = json.loads((data / "instances.json").read_text())
    for im in inst["images"][:2]:  # two missing files: failure records must survive the crash too
        (data / "images" / im["file_name"]).unlink()
    all_keys = {make_key("synth", im["id"]) for im in inst["images"]}
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    env = {**os.environ, **worker_env(), "USE_PROBE_DELAY": "0.15", "USE_TEST_RUN": marker}

    first = subprocess.Popen(_command(data, out), cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        # kill once 3 shards are in, the two failures among them (blocks need not arrive in input order)
        while first.poll() is None and time.time() < deadline and (
                len(list(out.glob("*.stats.json"))) < 3 or len(shards.failure_records(out, finish_commits=False)) < 2):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed: " + first.stderr.read().decode()[-2000:]
        os.kill(first.pid, signal.SIGKILL)  # the driver only, mid-run
        first.wait(timeout=60)
    finally:
        # Every Ray process of that run, before its output is read: a write task left running would still
        # commit a shard after the read (CI saw 2 keys more done at the rerun than read here).
        killed = kill_marked(marker)
        first.stderr.close()
    print(f"{killed} Ray processes of the killed run were still alive")
    assert first.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    committed, committed_failed = shards.done_keys(out)
    assert 0 < len(committed | committed_failed) < len(all_keys)

    second = subprocess.run(_command(data, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # the two missing files are the environment's fault: not done, retried by the rerun (and still missing)
    assert summary["already_done"] == len(committed) and summary["retried"] == len(committed_failed) == 2
    assert summary["processed_this_run"] == len(all_keys) - summary["already_done"]

    in_shards = shard_keys(out)
    failed = [f["key"] for f in shards.read_failures(out).to_pylist()]
    assert max(in_shards.values()) == 1, "a key written twice"
    assert len(failed) == len(set(failed)) == 2, "a failure recorded twice"
    assert not set(in_shards) & set(failed), "a key both written and failed"
    assert set(in_shards) | set(failed) == all_keys, "a key missing"
    assert committed <= set(in_shards)  # what the killed run committed stays
    assert (summary["written"], summary["failed"]) == (len(all_keys) - 2, 2)
