"""The run directory is a run's state: refuse to spoil it, clear it only when asked, rewind it on resume.

As open_clip does ("Experiment already exists"), training into a directory that already holds a
run is refused unless the user says what they mean: ``--resume`` continues it, ``--overwrite`` starts
afresh (only the files a run writes are removed; anything else in the folder is left alone). On
resume, the step logs are cut back to the checkpoint's step, so steps that were logged after the
last checkpoint and are now trained again do not appear twice and the curves never run backwards
(TensorBoard does the same for its event files through ``SummaryWriter(purge_step=...)``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import InputError
from .files import atomic_write_text

#: What a training run writes under its output directory (and ``--overwrite`` removes).
RUN_FILES = ("checkpoints", "final", "tensorboard", "keys", "metrics.jsonl", "summary.json", "training.png",
             "train_config.yaml")


class RunDirError(InputError):
    """The output directory holds another run and neither --resume nor --overwrite was given."""


def existing_run(output: str | Path) -> list[str]:
    out = Path(output)
    return [name for name in RUN_FILES if (out / name).exists()]


def check_run_dir(output: str | Path, resume: str | None, overwrite: bool) -> None:
    """Raise :class:`RunDirError` when ``output`` holds a run and this one would mix into it."""
    found = existing_run(output)
    if found and resume is None and not overwrite:
        raise RunDirError(f"{output} already holds a training run ({', '.join(found)}): continue it with --resume "
                          f"or start afresh with --overwrite")


def clear_run_dir(output: str | Path) -> None:
    """Remove what an earlier run wrote (``--overwrite``); other files stay."""
    out = Path(output)
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def truncate_step_log(path: str | Path, step: int, step_of=lambda line: json.loads(line)["step"]) -> int:
    """Keep the lines of a per-step log whose step is ``<= step``; returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if int(step_of(line)) <= step:
                kept.append(line)
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # a line cut by a crash mid-write
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def rewind_logs(output: str | Path, step: int, rank: int) -> int:
    """Cut this rank's step logs back to ``step`` (the resumed checkpoint's): ``metrics.jsonl`` on
    rank 0, ``keys/rank{rank}.txt`` on each rank. Returns how many lines were dropped."""
    out = Path(output)
    dropped = truncate_step_log(out / "metrics.jsonl", step) if rank == 0 else 0
    return dropped + truncate_step_log(out / "keys" / f"rank{rank}.txt", step, step_of=lambda line: line.split()[0])
