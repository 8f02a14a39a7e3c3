"""The trainer's two kinds of failure, which the CLI turns into one line and an exit status.

:class:`InputError` (exit 2): what the user gave cannot be trained on (no config, no shards, no
stats, no samples, a run directory that holds another run, no loadable checkpoint); raised before
anything is written. :class:`TrainingFailed` (exit 1): the run itself went wrong (every step of it
skipped for non-finite values, non-finite weights); no final model is written.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input to the trainer; nothing has been written."""


class TrainingFailed(RuntimeError):
    """The run produced nothing usable; ``summary.json`` says why, no ``final/`` model is written."""
