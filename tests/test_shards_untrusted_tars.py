"""issue 9 §4: the reader treats shards as untrusted (no transparent decompression, member, JSON, pixel,
segment and RLE caps, the JSON's size against the image header), skipping with a counted warning or
raising; the validator reports the same limits and keys that are in two shards."""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import tarfile

import pytest
from shards_util import make_sample, sample_members, write_dataset

import shards
from shards.schema import SampleLimits
from shards.validate import validate


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(i: int) -> list[tuple[str, bytes]]:
    meta, image, _ = make_sample(i)
    return sample_members(meta, image)


def _claiming(i: int, **fields) -> list[tuple[str, bytes]]:
    meta, image, _ = make_sample(i)
    return sample_members({**meta.to_dict(), **fields}, image)


def _keys(tmp_path, **kw) -> list[str]:
    return [s.key for s in shards.open_shards(tmp_path, on_error="skip", split_by_worker=False, **kw)]


def test_gzipped_tar_is_refused_not_decompressed(tmp_path, caplog):
    (tmp_path / "shard-000000.tar").write_bytes(gzip.compress(_tar(_good(0))))
    (tmp_path / "shard-000001.tar").write_bytes(_tar(_good(1)))
    with caplog.at_level(logging.WARNING, logger="shards.reader"):
        assert _keys(tmp_path) == ["test_1"]
    assert "compressed shards are refused" in caplog.text and "1 skipped so far" in caplog.text
    with pytest.raises(shards.SchemaError, match="not a readable plain tar"):
        list(shards.iter_samples(tmp_path))


def _long_counts(i: int) -> list[tuple[str, bytes]]:
    d = json.loads(_good(i)[0][1])
    d["segments"][0]["rle"]["counts"] = "0" * 5000  # rejected on its length, before it is parsed
    return [(f"test_{i}.json", json.dumps(d).encode()), _good(i)[1]]


def _big_image(i: int) -> list[tuple[str, bytes]]:
    return [(n, d + b"\0" * 5000 if n.endswith(".png") else d) for n, d in _good(i)]


def _segments(i: int, n: int) -> list[tuple[str, bytes]]:
    meta, image, _ = make_sample(i, n_segments=n)
    return sample_members(meta, image)


CASES = {  # bad middle sample, limits under which the two good ones pass, the reason
    "pixels": (lambda: _claiming(1, width=40000, height=40000, segments=[]), SampleLimits(),
               "1600000000 pixels, more than"),
    "header": (lambda: _claiming(1, width=30, height=40, segments=[]), SampleLimits(),
               "image is 40x30 but the JSON says 30x40"),
    "segments": (lambda: _segments(1, 6), SampleLimits(max_segments=5), "6 segments, more than the limit of 5"),
    "counts": (lambda: _long_counts(1), SampleLimits(max_counts_chars=4000), "is 5000 characters, more than the limit of 4000"),
    "member": (lambda: _big_image(1), SampleLimits(max_member_bytes=4000), "more than the limit of 4000; not read"),
    "json": (lambda: _segments(1, 40), SampleLimits(max_json_bytes=4000), "bytes, more than the limit of 4000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_skips_with_a_counted_warning_or_raises(tmp_path, caplog, case):
    bad, limits, reason = CASES[case]
    (tmp_path / "shard-000000.tar").write_bytes(_tar(_good(0) + bad() + _good(2)))
    with caplog.at_level(logging.WARNING, logger="shards.reader"):
        assert _keys(tmp_path, limits=limits) == ["test_0", "test_2"]
    assert reason in caplog.text and "(1 skipped so far" in caplog.text
    with pytest.raises(shards.SchemaError, match=re.escape(reason)):
        list(shards.open_shards(tmp_path, split_by_worker=False, limits=limits))


def test_validator_reports_keys_in_two_shards(tmp_path):
    write_dataset(tmp_path, 4, max_samples=2)
    assert validate(tmp_path) == []
    (tmp_path / "shard-000002.tar").write_bytes(_tar(_good(1)))
    problems = [str(p) for p in validate(tmp_path)]
    assert any(p.startswith("shard-000002.tar test_1: key is also in shard-000000.tar") for p in problems), problems


def test_validator_reports_limits_without_reading_the_claims(tmp_path):
    huge_rle = _claiming(0)
    d = json.loads(huge_rle[0][1])
    d["segments"][0]["rle"]["counts"] = "0" * (5 << 20)  # a 5 MB RLE string, over the 4 M character cap
    members = [(huge_rle[0][0], json.dumps(d).encode()), huge_rle[1]] + _claiming(1, width=40000, height=40000,
                                                                                  segments=[])
    (tmp_path / "shard-000000.tar").write_bytes(_tar(members))
    problems = [str(p) for p in validate(tmp_path)]
    assert any("test_0" in p and "more than the limit of 4194304" in p for p in problems), problems
    assert any("test_1" in p and "1600000000 pixels, more than the limit" in p for p in problems), problems


def test_samples_before_a_bad_shard_arrive_before_its_error(tmp_path):
    """The reader decodes windows of samples; a shard that fails mid-window still comes after the
    samples read before it, as with one sample at a time."""
    (tmp_path / "shard-000000.tar").write_bytes(_tar(_good(0) + _good(1)))
    (tmp_path / "shard-000001.tar").write_bytes(gzip.compress(_tar(_good(2))))
    seen = []
    with pytest.raises(shards.SchemaError, match="not a readable plain tar"):
        for s in shards.iter_samples(tmp_path):
            seen.append(s.key)
    assert seen == ["test_0", "test_1"]
