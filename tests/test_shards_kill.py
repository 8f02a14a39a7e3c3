"""A writer killed at any instant leaves only complete shards under final names, and resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shards_util import make_sample

import shards
from shards import writer as writer_mod
from shards.validate import check_shard, validate

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 12
PER_SHARD = 4

CHILD = textwrap.dedent(f"""
    import sys, time
    from shards_util import make_sample
    import shards
    with shards.ShardWriter(sys.argv[1], max_samples={PER_SHARD}) as w:
        for i in range({TOTAL}):
            w.write(*make_sample(i)[:2])
            print(i, flush=True)
            time.sleep(0.05)
    print("done", flush=True)
""")


def test_sigkill_mid_shard_leaves_no_partial_shard(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in child.stdout:  # two samples into the second shard: mid-shard, far from a commit
            if line.strip() == str(PER_SHARD + 1):
                break
        else:
            pytest.fail("the writer finished or died before it could be killed")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    # Before any clean-up: the half-filled shard exists only under a temporary name.
    assert [p.name for p in out.glob(".*.tmp")] == [".shard-000001.tar.tmp"]
    tars = shards.list_shards(out)
    assert [p.name for p in tars] == ["shard-000000.tar"]
    for tar in tars:
        assert check_shard(tar) == []
        assert writer_mod.stats_path(tar).exists()

    shards.recover(out)
    assert list(out.glob("*.tmp")) == [] and list(out.glob(".*.tmp")) == []
    assert validate(out) == []

    written, failed = shards.done_keys(out)
    assert written == {f"test_{i}" for i in range(PER_SHARD)} and failed == set()
    with shards.ShardWriter(out, max_samples=PER_SHARD) as w:
        assert w.index == 1
        for i in range(TOTAL):
            if f"test_{i}" not in written:
                w.write(*make_sample(i)[:2])
    keys = [s.key for s in shards.iter_samples(out)]
    assert keys == [f"test_{i}" for i in range(TOTAL)]  # every input exactly once, in order
    assert validate(out) == []


@pytest.mark.parametrize("crash_on", [1, 2], ids=["before-tar-rename", "between-tar-and-stats-rename"])
def test_crash_inside_commit(tmp_path, monkeypatch, crash_on):
    """A crash in either rename of a commit: recover() removes the shard or finishes its commit."""
    real_replace = os.replace
    calls = []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_on:
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    w = shards.ShardWriter(tmp_path, max_samples=10)
    for i in range(2):
        w.write(*make_sample(i)[:2])
    monkeypatch.setattr(writer_mod.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        w.flush()
    monkeypatch.setattr(writer_mod.os, "replace", real_replace)

    committed = crash_on == 2
    assert [p.name for p in shards.list_shards(tmp_path)] == (["shard-000000.tar"] if committed else [])
    for tar in shards.list_shards(tmp_path):  # the tar under its final name is complete even without stats
        assert check_shard(tar) == []
    shards.recover(tmp_path)
    assert list(tmp_path.glob(".*.tmp")) == []
    if committed:
        assert validate(tmp_path) == []
    else:
        assert shards.list_shards(tmp_path) == []
    assert shards.done_keys(tmp_path)[0] == ({"test_0", "test_1"} if committed else set())
    assert shards.ShardWriter(tmp_path).index == (1 if committed else 0)
