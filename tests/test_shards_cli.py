"""The shards CLI's conventions (``--output`` with the ``--out`` alias, ``--version``) and its verdict on
a directory that holds no samples (issue 10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from shards_util import write_dataset

import shards
from shards import cli
from shards.validate import validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--output", "--out"])
def test_inspect_output_flag_and_its_alias(tmp_path, flag, capsys):
    write_dataset(tmp_path / "shards", 1)
    assert cli.main(["inspect", str(tmp_path / "shards"), flag, str(tmp_path / "png"), "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["test_0.png"]
    assert f"wrote 1 overlay(s) to {tmp_path / 'png'}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"python -m shards {cli.version()}" and cli.version()[0].isdigit()


def test_console_script_shows_its_own_name():
    proc = subprocess.run([str(Path(sys.executable).with_name("use-shards")), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: use-shards ")


def test_validate_directory_without_samples_fails(tmp_path, capsys):
    """A job whose every input failed leaves shards with failure records only: nothing to train on."""
    with shards.ShardWriter(tmp_path, max_samples=2) as writer:
        writer.add_failure("test_0", "read", "not an image")
        writer.add_failure("test_1", "read", "not an image")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar"]
    assert [p.message for p in validate(tmp_path)] == ["no samples in 1 shard(s): there is nothing to train on"]
    assert cli.main(["validate", str(tmp_path), "--no-progress"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{tmp_path.name} -: no samples in 1 shard(s): there is nothing to train on"
    assert lines[-1].startswith("1 problem(s) in 1 file(s)")
