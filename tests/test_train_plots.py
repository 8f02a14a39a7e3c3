"""Training curves are drawn from metrics.jsonl, skipped steps left out, an empty log refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trainer.plots import plot_metrics


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
