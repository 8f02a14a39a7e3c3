"""One retry rule for a batch that raises (``pipeline.retry``): the batch, then each item alone; only
the culprit fails. The job's stage runner follows it (the model stages' own uses are in their tests)."""

from __future__ import annotations

import numpy as np
from fixtures_models import image_bytes, make_batch

from pipeline.job import StageRunner
from pipeline.record import Record, records_of, with_records
from pipeline.retry import retry_per_item


def test_a_batch_that_runs_is_one_call():
    calls = []
    out = retry_per_item([1, 2, 3], lambda xs: calls.append(list(xs)) or [x * 10 for x in xs], lambda x, e: None)
    assert calls == [[1, 2, 3]] and out == [([1, 2, 3], [10, 20, 30])]


def test_only_the_culprit_fails_and_its_neighbours_are_run_alone():
    calls, failed = [], []

    def run(xs):
        calls.append(list(xs))
        if 2 in xs:
            raise ValueError("two is bad")
        return [x * 10 for x in xs]

    out = retry_per_item([1, 2, 3], run, lambda x, e: failed.append((x, str(e))))
    assert calls == [[1, 2, 3], [1], [2], [3]]
    assert out == [([1], [10]), ([3], [30])]
    assert failed == [(2, "two is bad")]
    assert retry_per_item([], run, lambda x, e: None) == [] and calls[-1] == [3]  # nothing to run: no call


class _RefusesB:
    """A stage that raises on any batch holding key ``t_b`` and captions every other row."""

    calls: list[list[str]] = []

    def __init__(self, config):
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        type(self).calls.append(keys)
        if "t_b" in keys:
            raise RuntimeError("refuses b")
        records = records_of(batch)
        for r in records:
            r.image_ext = "png"
        return with_records(batch, records)


def test_the_stage_runner_fails_only_the_row_that_raises():
    _RefusesB.calls = []
    runner = StageRunner("captioner", _RefusesB, config=None)
    records = [Record(source="t", image_id=i) for i in "abc"]
    batch = make_batch(records, [image_bytes(16, 16)] * 3)
    out = records_of(runner(batch))
    assert _RefusesB.calls == [["t_a", "t_b", "t_c"], ["t_a"], ["t_b"], ["t_c"]]
    assert [r.failure is None for r in out] == [True, False, True]
    assert (out[1].failure.stage, out[1].failure.error) == ("captioner", "RuntimeError: refuses b")
    assert [r.image_ext for r in out] == ["png", "jpg", "png"]
