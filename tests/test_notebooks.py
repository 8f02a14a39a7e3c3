"""The shard inspection notebook runs top to bottom from ``notebooks/`` (as a user opens it), on real
shards, and shows what it promises: validation, summary, histograms and overlays."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inspect_shards.ipynb"


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.slow
def test_inspect_notebook_runs_from_the_notebooks_folder(synth_shards, monkeypatch):
    monkeypatch.setenv("USE_SHARDS", str(synth_shards))
    monkeypatch.setenv("USE_N_OVERLAYS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = _outputs(nb)
    text = "".join(o.get("text", "") for o in outputs)
    assert "0 problem(s)" in text
    assert "histograms: segments per image, texts per segment, mask areas" in text
    assert "text sources: {'synth': " in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    figures = [o for o in images if "Figure" in o["data"].get("text/plain", "")]
    assert len(figures) == 2, "the histograms and the text-source chart are plots"
    assert len(images) - len(figures) == 2, "two overlays displayed"


@pytest.mark.slow
def test_default_shards_path_is_taken_from_the_repository(monkeypatch):
    """Opened from ``notebooks/`` without ``USE_SHARDS``, the notebook looks in the repository's
    ``outputs/demo/shards`` (not ``notebooks/outputs/...``) and says so when it is not there."""
    monkeypatch.delenv("USE_SHARDS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = copy.deepcopy(nb)
    first.cells = [c for c in nb.cells if c.cell_type == "code"][:1]
    client = NotebookClient(first, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    default = REPO / "outputs" / "demo" / "shards"
    if default.is_dir():
        client.execute()
        assert f"shards: {default}" in "".join(o.get("text", "") for o in _outputs(first))
        return
    with pytest.raises(CellExecutionError) as e:
        client.execute()
    assert f"no shard directory at {default}: run `make demo` first" in str(e.value)
