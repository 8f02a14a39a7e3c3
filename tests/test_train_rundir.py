"""The run directory: not spoiled by a second run, rewound on resume, readable by others; a run
that trained nothing is a failure."""

from __future__ import annotations

import json
import os
import stat

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import config, metrics

from trainer.errors import InputError, TrainingFailed
from trainer.model import SegmentTextLoss
from trainer.train import Trainer, train


def test_existing_run_is_refused_without_resume_or_overwrite(synth_shards, tmp_path):
    out = tmp_path / "run"
    train(config("steps=2"), synth_shards, out, device="cpu")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(InputError, match="already holds a training run.*--resume.*--overwrite"):
        train(config("steps=2"), synth_shards, out, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    train(config("steps=3"), synth_shards, out, device="cpu", overwrite=True)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]  # afresh: the old run's lines are gone
    assert (out / "notes.txt").read_text() == "mine"  # what the run did not write stays


def test_resume_rewinds_the_logs_to_the_checkpoint(synth_shards, tmp_path, monkeypatch):
    """Steps 1-3 trained, a checkpoint at 2, a crash in step 4: the resumed run trains 3 and 4 again,
    and metrics.jsonl, the keys logs and TensorBoard hold each step once."""
    out = tmp_path / "run"
    overrides = ["steps=4", "checkpoint_every=2", "log_keys=true"]
    real_step = Trainer.train_step

    def crash_in_step_4(self, batch):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated"):
        train(config(*overrides), synth_shards, out, device="cpu")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(config(*overrides), synth_shards, out, resume="latest", device="cpu")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [line.split()[0] for line in (out / "keys" / "rank0.txt").read_text().splitlines()] == ["1", "2", "3", "4"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_run_whose_steps_were_all_skipped_fails(synth_shards, tmp_path, monkeypatch):
    original = SegmentTextLoss.forward
    monkeypatch.setattr(SegmentTextLoss, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(TrainingFailed, match="all 2 steps of this run were skipped"):
        train(config("steps=2"), synth_shards, out, device="cpu")
    assert not (out / "final").exists()
    assert "all 2 steps" in json.loads((out / "summary.json").read_text())["failed"]


def test_outputs_are_readable_by_the_group(synth_shards, tmp_path):
    old = os.umask(0o022)
    try:
        train(config("steps=1"), synth_shards, tmp_path / "run", device="cpu")
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [run / "final" / "model.safetensors", run / "final" / "config.json", run / "summary.json",
             *(run / "checkpoints" / "step-00000001").iterdir()]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o644 for f in files}
