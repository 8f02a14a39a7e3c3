"""A real 2-process DDP run on CPU: ``torchrun -m trainer train`` with gloo on the synthetic shards.

Checks what DDP training promises: the ranks read disjoint shards in every epoch, the loss falls,
and the trainable parameters are identical on both ranks at the end (all-reduced at the end of
the run by the trainer itself, ``summary.json``), and the final model loads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import DEMO, FAST, ROOT, losses

from trainer.distributed import rank_divergence
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
        lines = (out / "keys" / f"rank{rank}.txt").read_text().splitlines()
        # equal step counts (a rank that ran dry would hang the other), full batches on both
        assert [int(line.split()[0]) for line in lines] == list(range(1, STEPS + 1)), rank
        for line in lines:
            step, epoch, *keys = line.split()
            assert len(keys) == 4, (rank, step)
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


def _divergence_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        same = [torch.arange(6.0).view(2, 3), torch.tensor(1.5)]
        differ = [torch.arange(6.0).view(2, 3), torch.tensor(1.5 + 0.25 * rank)]
        result = torch.tensor([rank_divergence(same), rank_divergence(differ)])
    finally:
        dist.destroy_process_group()
    torch.save({"result": result}, Path(out) / f"rank{rank}.pt")


def test_rank_divergence_sees_a_difference(tmp_path):
    """The figure the DDP test relies on: 0 only when the ranks hold the same values."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_divergence_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        same, differ = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["result"].tolist()
        assert same == 0.0 and differ == pytest.approx(0.25), rank
