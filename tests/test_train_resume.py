"""Training N steps in one go equals N/2 steps, an interruption, and N/2 more after --resume.

The interruption falls mid-epoch with two DataLoader workers at an odd batch position, so the
resumed loader must drop the consumed samples in each worker and realign the workers' round-robin.
"""

from __future__ import annotations

from train_helpers import config, losses, max_weight_diff, weights

from trainer.train import train

STEPS = 6


def test_resume_gives_the_same_weights(synth_shards, tmp_path):
    overrides = [f"steps={STEPS}", "data.workers=2", "checkpoint_every=100", "log_keys=true"]
    whole = tmp_path / "whole"
    train(config(*overrides), synth_shards, whole, device="cpu")

    split = tmp_path / "split"
    first = train(config(*overrides, f"stop_at={STEPS // 2}"), synth_shards, split, device="cpu")
    assert first["stopped"] and first["steps"] == STEPS // 2
    assert not (split / "final").exists()
    second = train(config(*overrides), synth_shards, split, resume="latest", device="cpu")
    assert second["steps"] == STEPS

    # the data position: the resumed run trains on exactly the batches the uninterrupted one did
    keys_whole = (whole / "keys" / "rank0.txt").read_text().splitlines()
    keys_split = (split / "keys" / "rank0.txt").read_text().splitlines()
    assert len(keys_whole) == STEPS and keys_split == keys_whole

    a, b = losses(whole), losses(split)
    print("losses in one go:", [round(x, 5) for x in a])
    print("losses with resume:", [round(x, 5) for x in b])
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    diff = max_weight_diff(weights(whole / "final"), weights(split / "final"))
    print(f"max weight difference: {diff:.3g}")
    assert diff < 1e-6


def test_resume_with_another_schedule_is_reported(synth_shards, tmp_path, caplog):
    overrides = ["steps=4", "checkpoint_every=100"]
    train(config(*overrides, "stop_at=2"), synth_shards, tmp_path, device="cpu")
    with caplog.at_level("WARNING", logger="trainer.train"):
        train(config(*overrides), synth_shards, tmp_path, resume="latest", device="cpu")
    assert "another LR schedule" not in caplog.text  # same config: nothing to report
    train(config("steps=3", "checkpoint_every=100", "stop_at=3"), synth_shards, tmp_path / "b", device="cpu")
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.train"):
        train(config("steps=5", "checkpoint_every=100"), synth_shards, tmp_path / "b", resume="latest", device="cpu")
    assert "another LR schedule" in caplog.text and "'total_steps': 5" in caplog.text
