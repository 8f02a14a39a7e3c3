"""`make setup` is idempotent: once it has run, make considers it up to date and does nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_second_setup_is_a_no_op():
    if not (ROOT / ".venv" / ".setup-stamp").exists():
        pytest.skip("this environment was not installed by `make setup` (no .venv/.setup-stamp)")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -q: exit 0 when the target is up to date, 1 when make would run something. The stamp is the
    # install; `setup` also runs the phony `setup-browser`, which checks for chromium and installs nothing
    # once it is there.
    assert subprocess.run(["make", "-q", ".venv/.setup-stamp"], cwd=ROOT).returncode == 0
    dry = subprocess.run(["make", "-n", "setup"], cwd=ROOT, capture_output=True, text=True)
    assert "pip install" not in dry.stdout

