"""A real 2-process DDP run on CPU: ``torchrun -m trainer train`` with gloo on the synthetic shards.

Checks what DDP training promises: the ranks read disjoint shards in every epoch, the loss falls,
and the trainable parameters are identical on both ranks at the end (all-reduced at the end of
the run by the trainer itself, ``summary.json``), and the final model loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import DEMO, FAST, ROOT, losses

from trainer.model import USEModel

STEPS = 10  # 40 images / (4 x 2 ranks) = 5 steps per epoch: two epochs


@pytest.mark.slow
def test_two_process_ddp(synth_shards, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer", "train", "--config", str(DEMO),
           "--shards", str(synth_shards), "--output", str(out), "--device", "cpu",
           *FAST, f"steps={STEPS}", "data.workers=1", "log_keys=true", "log_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "gloo process group" in proc.stderr

    per_rank: dict[int, dict[int, set[str]]] = {}
    for rank in (0, 1):
        for line in (out / "keys" / f"rank{rank}.txt").read_text().splitlines():
            step, epoch, *keys = line.split()
            per_rank.setdefault(rank, {}).setdefault(int(epoch), set()).update(keys)
    for epoch in (0, 1):
        a, b = per_rank[0][epoch], per_rank[1][epoch]
        print(f"epoch {epoch}: rank 0 saw {len(a)} images, rank 1 saw {len(b)}, shared {len(a & b)}")
        assert a and b and not (a & b)

    loss = losses(out)
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    print(f"loss: first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert len(loss) == STEPS and last < 0.8 * first

    summary = json.loads((out / "summary.json").read_text())
    print("max parameter difference across ranks:", summary["rank_param_max_diff"])
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["rank_param_max_diff"] == 0.0
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # curves drawn by rank 0
    model = USEModel.from_pretrained(out / "final")
    assert model.grid == 8
