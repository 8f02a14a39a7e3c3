"""`python -m shards validate` passes good shards and names shard, key and cause for each bad case."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from shards_util import make_sample, sample_members, write_dataset, write_tar

from shards import cli, rle
from shards.rle import rle_counts
from shards.validate import validate
from shards.writer import stats_path

ROOT = Path(__file__).resolve().parents[1]
SHARD = "shard-000000.tar"


def run_validate(directory: Path, capsys) -> tuple[int, list[str]]:
    code = cli.main(["validate", str(directory), "--no-progress"])
    return code, capsys.readouterr().out.strip().splitlines()


def test_good_shards_pass(tmp_path, capsys):
    write_dataset(tmp_path, 5, max_samples=2)
    assert validate(tmp_path) == []
    code, lines = run_validate(tmp_path, capsys)
    assert code == 0
    assert lines == [f"OK: 3 shard(s) checked in {tmp_path}, no problems"]


def test_synthetic_dataset_shards_pass(synth_val_shards, capsys):
    assert run_validate(synth_val_shards, capsys)[0] == 0


def test_truncated_tar_via_subprocess(tmp_path):
    """The real command line: a half-written tar is reported, not a traceback, and exits 1."""
    write_dataset(tmp_path, 2, max_samples=2)
    tar = tmp_path / SHARD
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
    tar.write_bytes(tar.read_bytes()[: last.offset_data + last.size // 2])  # cut inside the last member
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "shards", "validate", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{SHARD} -: tar is truncated or corrupt (unexpected end of data" in proc.stdout
    assert "sha256 of the tar" in proc.stdout  # the stats file no longer matches either
    assert proc.stdout.strip().splitlines()[-1].startswith("3 problem(s) in 1 file(s)")  # + the lost sample


def test_tar_cut_at_a_member_boundary(tmp_path, capsys):
    """tarfile reads a tar cut between members without error; the missing end marker gives it away."""
    write_dataset(tmp_path, 2, max_samples=2)
    tar = tmp_path / SHARD
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
    tar.write_bytes(tar.read_bytes()[: last.offset])
    stats_path(tar).unlink()
    code, lines = run_validate(tmp_path, capsys)
    assert code == 1
    assert lines[0].startswith(f"{SHARD} -: tar is truncated")


def _good(index: int = 0):
    meta, image, _ = make_sample(index)
    return meta.to_dict(), image


def _json_case(mutate):
    def build():
        d, image = _good()
        mutate(d)
        return sample_members(d, image)
    return build


def _members_case(*extra: tuple[str, bytes]):
    def build():
        return [*sample_members(*_good()), *extra]
    return build


def _set(path: str, value):
    def mutate(d):
        *parents, last = path.split("/")
        node = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value
    return mutate


def _other_size_image():
    d, _ = _good()
    _, image, _ = make_sample(0, width=33, height=30)
    return sample_members(d, image)


def _symlink():
    info = tarfile.TarInfo("test_0.txt")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    return [*sample_members(*_good()), info]


def _second_image():
    d, image = _good()
    return [*sample_members(d, image), ("test_0.jpg", image)]


# (case id, builder of the tar's members, expected key column, expected message fragment)
BAD_CASES = [
    ("dotdot", _members_case(("../evil.json", b"{}")), "-", "member '../evil.json' contains '..'"),
    ("absolute", _members_case(("/tmp/evil.json", b"{}")), "-", "member '/tmp/evil.json' has an absolute path"),
    ("directory", _members_case(("sub/test_1.json", b"{}")), "-", "is inside a directory"),
    ("pickle", _members_case(("test_0.pickle", pickle.dumps({"a": 1}))), "test_0", "has type .pickle, which is not allowed"),
    ("pyd", _members_case(("test_0.pyd", pickle.dumps([1]))), "test_0", "has type .pyd, which is not allowed"),
    ("pth", _members_case(("test_0.pth", b"PK")), "test_0", "has type .pth, which is not allowed"),
    ("key-with-dot", _members_case(("test_0.extra.json", b"{}")), "test_0", "keys must not contain dots"),
    ("symlink", _symlink, "-", "is not a regular file"),
    ("schema-version", _json_case(_set("schema_version", 99)), "test_0", "JSON breaks the schema: schema_version is 99"),
    ("schema-bbox", _json_case(_set("segments/0/bbox", "wide")), "test_0", "segments[0].bbox must be [x, y, w, h]"),
    ("schema-id", _json_case(_set("segments/0/id", None)), "test_0", "segments[0].id must be an integer"),
    ("not-json", lambda: [("test_0.json", b"{oops"), ("test_0.png", _good()[1])], "test_0", ".json is not valid UTF-8 JSON"),
    ("rle-size", _json_case(_set("segments/1/rle/size", [31, 40])), "test_0",
     "segments[1].rle.size [31, 40] differs from the image size [30, 40]"),
    ("image-size", _other_size_image, "test_0", "image is 33x30 (WxH) but the JSON says 40x30"),
    ("rle-garbage", _json_case(_set("segments/0/rle/counts", "0000")), "test_0",
     "segments[0].rle.counts cover 0 pixels, the image has 1200 (30x40)"),
    ("rle-truncated", _json_case(_set("segments/0/rle/counts", "a")), "test_0", "segments[0].rle.counts is malformed: counts ends in the middle"),
    ("empty-text", _json_case(_set("segments/2/texts/0/text", "  ")), "test_0", "segments[2].texts[0].text is empty"),
    ("no-texts", _json_case(_set("segments/0/texts", [])), "test_0", "segments[0] has no texts"),
    ("bbox", _json_case(_set("segments/0/bbox", [0.0, 0.0, 5.0, 5.0])), "test_0",
     "segments[0] (id 0): bbox [0, 0, 5, 5] but the mask's box is"),
    ("area", _json_case(_set("segments/1/area", 3)), "test_0", "segments[1] (id 1): area 3 but the mask has"),
    ("empty-mask", _json_case(_set("segments/0/rle", rle.encode_one(np.zeros((30, 40), bool)))), "test_0",
     "segments[0] (id 0): mask is empty"),
    ("no-image", lambda: sample_members(*_good())[:1], "test_0", "exactly one image member"),
    ("two-images", _second_image, "test_0", "exactly one image member"),
    ("no-json", lambda: sample_members(*_good())[1:], "test_0", "sample has no .json member"),
    ("key-mismatch", lambda: [(n.replace("test_0", "test_7"), b) for n, b in sample_members(*_good())], "test_7",
     "JSON key 'test_0' differs from the member key"),
]


@pytest.mark.parametrize(("build", "key", "message"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_case_is_reported(tmp_path, capsys, build, key, message):
    write_tar(tmp_path / SHARD, build())
    code, lines = run_validate(tmp_path, capsys)
    assert code == 1
    prefix = f"{SHARD} {key}: "
    assert any(line.startswith(prefix) and message in line for line in lines), lines
    assert lines[-1].startswith(f"{len(lines) - 1} problem(s) in 1 file(s)")


def test_stats_file_must_describe_its_tar(tmp_path, capsys):
    """A tar changed after it was written no longer matches its stats file (hash, keys)."""
    write_dataset(tmp_path, 2, max_samples=2)
    tar = tmp_path / SHARD
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if not m.name.startswith("test_1")]
    write_tar(tar, members)
    code, lines = run_validate(tmp_path, capsys)
    assert code == 1
    assert any(line.startswith(f"{SHARD} -: sha256 of the tar") for line in lines)
    assert f"{SHARD} test_1: sample is listed in shard-000000.stats.json but not in the tar (a resumed job would skip it)" in lines


def test_pickle_payload_is_never_loaded(tmp_path, capsys):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (marker.touch, ())

    write_tar(tmp_path / SHARD, [*sample_members(*_good()), ("test_0.pickle", pickle.dumps(Trap()))])
    assert run_validate(tmp_path, capsys)[0] == 1
    assert not marker.exists()


def test_missing_or_empty_directory(tmp_path, capsys):
    code, lines = run_validate(tmp_path / "nope", capsys)
    assert code == 1 and "not a directory" in lines[0]
    code, lines = run_validate(tmp_path, capsys)
    assert code == 1 and "no shards (*.tar) in this directory" in lines[0]


def test_rle_parser_agrees_with_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = rng.integers(1, 60, 2)
        mask = rng.random((h, w)) < rng.random()
        counts = rle_counts(rle.encode_one(mask)["counts"])
        assert counts.sum() == h * w
        flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask)  # column-major, as COCO


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("validate", "stats", "inspect"))
    for cmd in ("validate", "stats", "inspect"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        assert "DIR" in capsys.readouterr().out.upper()
