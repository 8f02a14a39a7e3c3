"""``python -m trainer``: one line per input problem (exit 2, nothing written), failures exit 1,
Ctrl-C exits 130 with one line, ``--version``, ``--out`` for ``--output``, an ETA in the log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import DEMO, FAST, ROOT

from shards import shard_urls
from trainer import cli
from trainer.model import SegmentTextLoss


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    rc = cli.main(list(args))
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "interrupted"))]


def test_input_errors_are_one_line_each_all_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    rc, lines = _run(capsys, "train", "--config", str(tmp_path / "nope.yaml"), "--shards", str(tmp_path / "none"),
                     "--output", str(out))
    assert rc == 2 and lines == [f"error: --config {tmp_path / 'nope.yaml'}: no such file",
                                 f"error: --shards {tmp_path / 'none'}: no such directory"]
    assert not out.exists()
    rc, lines = _run(capsys, "train", "--config", str(DEMO), "--shards", str(tmp_path), "--output", str(out),
                     "steps=1", "optim.lrr=1")
    assert rc == 2 and len(lines) == 2 and "optim.lrr" in lines[0] and "no shards" in lines[1]
    assert not out.exists()


def test_shards_without_stats_or_samples(synth_shards, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    url = shard_urls(synth_shards)[0]
    shutil.copy(url, bare)
    out = tmp_path / "run"
    rc, lines = _run(capsys, "train", "--config", str(DEMO), "--shards", str(bare), "--output", str(out),
                     *FAST, "steps=1")
    assert rc == 2 and len(lines) == 1 and "has no stats file" in lines[0] and not out.exists()
    stats = url[: -len(".tar")] + ".stats.json"
    data = json.loads(open(stats).read())
    (bare / os.path.basename(stats)).write_text(json.dumps({**data, "samples": 0}))
    rc, lines = _run(capsys, "train", "--config", str(DEMO), "--shards", str(bare), "--output", str(out),
                     *FAST, "steps=1", "data.workers=1")
    assert rc == 2 and lines == ["error: 0 samples do not fill one global batch of 4 x 1"] and not out.exists()


def test_failed_run_exits_1(synth_shards, tmp_path, capsys, monkeypatch):
    original = SegmentTextLoss.forward
    monkeypatch.setattr(SegmentTextLoss, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    rc, lines = _run(capsys, "train", "--config", str(DEMO), "--shards", str(synth_shards),
                     "--out", str(tmp_path / "run"), "--device", "cpu", *FAST, "steps=1")
    assert rc == 1 and lines == ["error: training failed: all 1 steps of this run were skipped (non-finite loss or "
                                 "gradients, see the warnings): no final model written"]
    rc, lines = _run(capsys, "train", "--config", str(DEMO), "--shards", str(synth_shards),
                     "--out", str(tmp_path / "run"), "--device", "cpu", *FAST, "steps=1")
    assert rc == 2 and "already holds a training run" in lines[0]


def test_eta_in_the_log(synth_shards, tmp_path, capsys):
    rc = cli.main(["train", "--config", str(DEMO), "--shards", str(synth_shards), "--out", str(tmp_path / "r"),
                   "--device", "cpu", *FAST, "steps=2"])
    assert rc == 0
    steps = [line for line in capsys.readouterr().err.splitlines() if "trainer.train: step " in line]
    assert len(steps) == 2 and all(" | eta 00:0" in s for s in steps) and steps[-1].endswith("| eta 00:00")


def test_version_and_output_alias(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.split()[-1] == "0.1.0"
    for flag in ("--out", "--output"):
        args = cli.build_parser().parse_args(["cache-features", "--config", "c", "--shards", "s", flag, "X"])
        assert args.output == "X"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--config", "c", "--shards", "s", "--out", "o", "--resume",
                                       "--overwrite"])


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(synth_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(DEMO), "--shards", str(synth_shards),
           "--output", str(out), "--device", "cpu", *FAST, "steps=100000", "checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; rerun with --resume to continue from the last checkpoint"
