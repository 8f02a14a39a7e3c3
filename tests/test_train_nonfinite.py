"""A non-finite loss is reported and its step makes no update (weights and optimizer state unchanged)."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file
from train_helpers import config, metrics, weights

from trainer.model import SegmentTextLoss
from trainer.train import train


def test_nan_loss_is_reported_and_skipped(synth_shards, tmp_path, monkeypatch, caplog):
    original = SegmentTextLoss.forward
    calls = {"n": 0}

    def nan_on_second_call(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(SegmentTextLoss, "forward", nan_on_second_call)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        summary = train(config("steps=3", "checkpoint_every=1", "keep_checkpoints=5"), synth_shards, out, device="cpu")

    assert summary["skipped_steps"] == 1
    assert [m["skipped"] for m in metrics(out)] == [False, True, False]
    assert any("step 2: non-finite loss" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    ckpt = out / "checkpoints"
    w1, w2, w3 = (weights(ckpt / f"step-0000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the NaN step changed the weights"
    assert any(not torch.equal(w2[k], w3[k]) for k in w2), "training did not go on after the NaN step"
    o1, o2 = (load_file(str(ckpt / f"step-0000000{i}" / "optimizer.safetensors")) for i in (1, 2))
    assert all(torch.equal(o1[k], o2[k]) for k in o1), "the NaN step changed the optimizer state"
    assert all(torch.isfinite(v).all() for v in w3.values())
