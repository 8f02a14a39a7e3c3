"""Every command answers ``--help`` and argument errors without loading torch, Ray, transformers or faiss.

Those imports take 5-15 s here; the commands load them inside the handler that needs them. A fresh
interpreter per module, because this test process has long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "transformers", "faiss", "open_clip", "spacy")


def _help_in_a_fresh_interpreter(module: str) -> dict:
    code = ("import contextlib, io, json, sys\n"
            f"import {module} as cli\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
            "    cli.main(['--help'])\n"
            f"print(json.dumps({{'help': buf.getvalue(), 'heavy': [n for n in {HEAVY!r} if n in sys.modules]}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("module", "commands"), [
    ("pipeline.cli", ("curate", "models", "config")),
    ("shards.cli", ("validate", "inspect", "stats")),
    ("trainer.cli", ("train", "cache-features")),
    ("evaluation.cli", ("semseg", "prepare", "tiny-sam", "demo-summary", "index", "query")),
])
def test_help_lists_every_command_without_heavy_imports(module, commands):
    doc = _help_in_a_fresh_interpreter(module)
    assert doc["heavy"] == [], f"{module} --help loaded {doc['heavy']}"
    for command in commands:
        assert command in doc["help"], command


def test_amg_default_pixel_budget_is_the_sam_code_default():
    """``AMGConfig`` lives with the other evaluation settings (no torch); its budget stays SAM's default."""
    from evaluation.config import AMGConfig
    from pipeline.sam import MASK_PIXEL_BUDGET

    assert AMGConfig().mask_pixel_budget == MASK_PIXEL_BUDGET
