"""The shard inspection notebook runs top to bottom on real shards and shows what it promises."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_shards.ipynb"


@pytest.mark.slow
def test_inspect_notebook_runs(synth_shards, monkeypatch, tmp_path):
    monkeypatch.setenv("USE_SHARDS", str(synth_shards))
    monkeypatch.setenv("USE_N_OVERLAYS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "0 problem(s)" in text
    assert "text sources: {'synth': " in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "two overlays displayed"
