"""The one rule for a batch that raises: run it again item by item, so that only the culprits fail.

A model forward over a batch can raise because of one input (an image that runs a model out of
memory, a corrupt file that slipped through, a bug that one caption triggers). Failing the whole
batch would fail its good neighbours; stopping the job would lose everything. So every batched call
of the pipeline (the job's stage runner around each stage, and inside the captioner, grounder and
segmenter around each model forward) goes through :func:`retry_per_item`: the batch once, and when
it raises, each item alone; an item that raises alone is handed to ``fail`` with its error. A
systematic bug therefore still shows up as a failure of every item, never as a crashed job.

Written by hand: Ray's task retries re-run a whole task, and tenacity-style retry libraries retry the
same call; neither splits a batch.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def retry_per_item(items: Sequence[T], run: Callable[[Sequence[T]], R], fail: Callable[[T, BaseException], None],
                   *, what: str = "batch", describe: Callable[[T], str] = str) -> list[tuple[Sequence[T], R]]:
    """``run(items)``; if it raises and there is more than one item, ``run([item])`` for each item.

    Returns ``(group, result)`` for every call that succeeded: one pair for the whole batch, or one
    per item that succeeded alone. An item whose own call raises is passed to ``fail(item, error)``
    and has no pair. ``what`` and ``describe`` only name the batch and its items in the log.
    """
    if not items:
        return []
    try:
        return [(items, run(items))]
    except Exception as e:  # one bad input must not fail its neighbours
        if len(items) == 1:
            log.warning("%s failed for %s: %s: %s", what, describe(items[0]), type(e).__name__, e)
            fail(items[0], e)
            return []
        log.warning("%s failed on a batch of %d; retrying one at a time:\n%s", what, len(items),
                    traceback.format_exc(limit=3))
    out: list[tuple[Sequence[T], R]] = []
    for item in items:
        out += retry_per_item([item], run, fail, what=what, describe=describe)
    return out
