"""Training curves are drawn from metrics.jsonl, skipped steps left out, an empty log refused."""

from __future__ import annotations

import json

import matplotlib.axes
import numpy as np
import pytest
from PIL import Image

from trainer.plots import metric_rows, plot_metrics


def _rows(n: int, skipped: set[int] = frozenset()):
    for step in range(1, n + 1):
        yield {"step": step, "loss": 3.0 / step, "lr": 1e-3, "logit_scale": 14.0 + step, "segments": 20,
               "data_time": 0.01, "step_time": 0.05, "skipped": step in skipped}


def test_plot_is_a_picture(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in _rows(30, skipped={4})))
    png = plot_metrics(m, tmp_path / "training.png")
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[0] > 400 and img.shape[1] > 600
    assert (img < 128).mean() > 0.005  # something is drawn, not a blank canvas


def test_nothing_to_plot(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text(json.dumps(next(_rows(1, skipped={1}))))
    with pytest.raises(ValueError, match="no finished steps"):
        plot_metrics(m, tmp_path / "training.png")


def test_curves_use_each_step_once(tmp_path, monkeypatch):
    """A log with steps 3-4 written twice (trained, crashed before the next checkpoint, trained again):
    the picture is drawn from steps 1..6 once each, the later record of a repeated step winning."""
    rows = list(_rows(4)) + [{**r, "loss": 9.0} for r in _rows(6)][2:] + ["{\"step\": 7, \"lo"]
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    got = metric_rows(m)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6] and [r["loss"] for r in got][2:] == [9.0] * 4
    drawn = {}
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, x, *args, **kwargs):
        drawn.setdefault(self.get_title() or len(drawn), list(x))
        return real_plot(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_metrics(m, tmp_path / "training.png")
    assert drawn and all(x == [1, 2, 3, 4, 5, 6] for x in drawn.values())
