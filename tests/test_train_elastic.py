"""Elastic training: two "nodes" on this machine (two launches of ``infra/train_multinode.sh``, c10d
rendezvous on localhost, gloo), one rank killed mid-run; torchrun's ``--max-restarts`` restarts
every rank, they continue from the last checkpoint, and the final weights equal an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import DEMO, FAST, ROOT, max_weight_diff, metrics, weights

STEPS = 12
ARGS = [*FAST, f"steps={STEPS}", "checkpoint_every=4", "data.workers=1", "log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PY": sys.executable, **extra}


def _steps_logged(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two 2-rank runs on 2 shared cores: seconds alone, minutes under load
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(synth_shards, tmp_path):
    common = ["--config", str(DEMO), "--shards", str(synth_shards), "--device", "cpu"]
    whole = tmp_path / "whole"
    torchrun = Path(sys.executable).parent / "torchrun"
    ref = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer", "train", *common,
                          "--output", str(whole), *ARGS], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=540)
    assert ref.returncode == 0, ref.stderr[-4000:]

    out = tmp_path / "elastic"
    env = _env(NNODES="2", NPROC="1", HEAD="127.0.0.1", PORT=str(_free_port()), JOB_ID="use-elastic-test",
               MAX_RESTARTS="3")
    nodes = [subprocess.Popen(["bash", str(ROOT / "infra" / "train_multinode.sh"), *common, "--output", str(out),
                               "--resume", *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    try:
        deadline = time.time() + 300
        agent = psutil.Process(nodes[1].pid)  # the script execs torchrun: its child is node 1's worker
        victims: list[psutil.Process] = []
        while not victims and time.time() < deadline:
            victims = [p for p in agent.children() if "trainer" in " ".join(p.cmdline())]
            time.sleep(0.1)
        while _steps_logged(out) < 5 and time.time() < deadline:  # past the step-4 checkpoint
            time.sleep(0.05)
        victims[0].suspend()  # the other rank stops at its next collective: at most a step later
        killed_at = _steps_logged(out)
        victims[0].kill()
        logs = [n.communicate(timeout=540)[0] for n in nodes]
    finally:
        for n in nodes:  # the agents and their ranks (a rank left behind would load the rest of the suite)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.pid, signal.SIGKILL)
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-3000:] for log in logs)
    assert 5 <= killed_at < 8, killed_at  # steps after the checkpoint at 4 were lost and are trained again
    assert "resumed from" in "".join(logs) and "step-00000004 at step 4" in "".join(logs)
    # Each round's ranks meet in a store of their own: a store shared across rounds still holds the dead
    # ranks' addresses, and a restarted rank that reads one hangs in gloo's process-group creation.
    stores = re.findall(r"joined the gloo process group on cpu \(store (\S+), restart", "".join(logs))
    assert len(stores) >= 2 and len(set(stores)) == len(stores), stores

    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))  # each step once in the log
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    diff = max_weight_diff(weights(whole / "final"), weights(out / "final"))
    print(f"killed after step {killed_at}; max weight difference to the uninterrupted run: {diff:.3g}")
    assert diff < 1e-6
