"""issue 9 §3: what a shard's JSON claims is checked before anything acts on it (``SampleMeta.from_dict``),
and the reader refuses a sample whose member name is not its JSON's key."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import pytest
from shards_util import make_sample, sample_members

import shards
from shards.reader import decode_sample
from shards.sample_json import parse_sample_json, parse_sample_jsons
from shards.schema import MAX_KEY_CHARS, SampleLimits, SampleMeta, SchemaError


@pytest.fixture(scope="module")
def good() -> tuple[dict, bytes]:
    meta, image, _ = make_sample(0)
    return meta.to_dict(), image


def _with(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *parents, last = path.split("/")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value
    return d


def test_rle_that_does_not_cover_the_image_is_refused(good):
    d, _ = good
    SampleMeta.from_dict(d)  # the good one parses
    with pytest.raises(SchemaError, match=r"segments\[0\]\.rle\.counts cover 1 pixels, the image has 1200"):
        SampleMeta.from_dict(_with(d, "segments/0/rle/counts", "1"))
    with pytest.raises(SchemaError, match=r"segments\[1\]\.rle\.counts is malformed"):
        SampleMeta.from_dict(_with(d, "segments/1/rle/counts", "a"))


@pytest.mark.parametrize("path", ["captions/0/text", "segments/0/texts/0/text", "segments/0/texts/1/source",
                                  "image_id", "source", "file_name"])
def test_lone_surrogates_are_refused(good, path):
    bad = json.loads(json.dumps(_with(good[0], path, "a cat")).replace("a cat", "a \\ud800cat"))
    with pytest.raises(SchemaError, match="not valid Unicode text"):
        SampleMeta.from_dict(bad)


def test_long_keys_are_refused(good):
    d, _ = good
    SampleMeta.from_dict(_with(d, "key", "k" * MAX_KEY_CHARS))
    with pytest.raises(SchemaError, match=f"key is 300 characters, more than {MAX_KEY_CHARS}"):
        SampleMeta.from_dict(_with(d, "key", "k" * 300))
    assert not shards.schema.is_valid_key("k" * 300)


def test_limits_are_checked_before_the_claims_are_parsed(good):
    d, _ = good
    with pytest.raises(SchemaError, match="40000x40000 = 1600000000 pixels, more than the limit"):
        SampleMeta.from_dict({**d, "width": 40000, "height": 40000, "segments": []})
    with pytest.raises(SchemaError, match="3 segments, more than the limit of 2"):
        SampleMeta.from_dict(d, SampleLimits(max_segments=2))
    with pytest.raises(SchemaError, match=r"segments\[0\]\.rle\.counts is \d+ characters, more than the limit of 3"):
        SampleMeta.from_dict(d, SampleLimits(max_counts_chars=3))


def test_decode_sample_requires_the_member_key_to_equal_the_json_key(good):
    d, image = good
    members = dict(sample_members(d, image))
    raw = {"__key__": d["key"], "json": members[f"{d['key']}.json"], "png": image}
    assert decode_sample(raw).key == d["key"]
    with pytest.raises(SchemaError, match=r"member key differs from the JSON's key"):
        decode_sample({**raw, "__key__": "../../etc/evil"})


def test_reader_skips_a_renamed_sample(good, tmp_path):
    d, image = good
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("other.json", json.dumps(d).encode()), ("other.png", image)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "shard-000000.tar").write_bytes(buf.getvalue())
    assert list(shards.iter_samples(tmp_path, on_error="skip")) == []
    with pytest.raises(SchemaError, match="member key differs"):
        list(shards.iter_samples(tmp_path))


_VALUES = [None, True, 0, -1, 7, 2**70, 1.5, float("nan"), float("inf"), "", "  ", "x", "a b", [], [1, 2], [30, 40],
           {}, {"size": [30, 40]}, "1", "0" * 8, "\x1c"]
_PATHS = ["schema_version", "key", "image_id", "source", "width", "height", "image_ext", "file_name", "captions",
          "captions/0", "captions/0/text", "segments", "segments/1", "segments/1/id", "segments/1/rle",
          "segments/1/rle/size", "segments/1/rle/size/0", "segments/1/rle/counts", "segments/1/bbox",
          "segments/1/bbox/2", "segments/1/area", "segments/1/texts", "segments/1/texts/0", "segments/1/texts/1/text",
          "segments/1/texts/0/score", "segments/1/score"]


def _mutants(d: dict) -> list[bytes]:
    """The good sample with one field replaced by each odd value, or deleted, as JSON bytes."""
    out = []
    for path in _PATHS:
        out += [json.dumps(_with(d, path, v)).encode() for v in _VALUES]
        *parents, last = path.split("/")
        cut = copy.deepcopy(d)
        node = cut
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[int(last) if isinstance(node, list) else last]
        out.append(json.dumps(cut).encode())
    out += [json.dumps(d).encode().replace(b'"shape 1', b'"\\ud800shape 1'), b"{", b"[]", b"\xff", b'{"key": 1}' * 2,
            json.dumps({**d, "extra": 1}).encode(), json.dumps(d).replace('"key"', '"key": "x", "key"', 1).encode()]
    return out


def _outcome(parse, data: bytes):
    try:
        return _seen(parse(data))
    except Exception as e:
        return _seen(e)


def _seen_call(parse, data, limits: SampleLimits) -> tuple:
    try:
        return _seen(parse(data, limits))
    except Exception as e:
        return _seen(e)


def _seen(result) -> tuple:
    """What a caller sees: the sample (as JSON, so that NaN equals NaN), or the error's type and message."""
    if isinstance(result, Exception):
        return (type(result), str(result))
    return ("sample", json.dumps(result.to_dict()))


def test_fast_json_path_agrees_with_from_dict_on_broken_samples(good):
    """The reader's parse (pydantic-core + batched RLE check, ``from_dict`` for messages) accepts, refuses
    and words refusals exactly as ``SampleMeta.from_dict(json.loads(...))``, alone and in a batch."""
    datas = _mutants(good[0])
    reference = [_outcome(lambda b: SampleMeta.from_dict(json.loads(b)), b) for b in datas]
    accepted = sum(r[0] == "sample" for r in reference)
    assert accepted > 20 and len(reference) - accepted > 300
    for data, ref in zip(datas, reference, strict=True):
        assert _outcome(parse_sample_json, data) == ref, data
    assert [_seen(r) for r in parse_sample_jsons(datas)] == reference
    data = json.dumps(good[0]).encode()
    for limits in (SampleLimits(max_counts_chars=3), SampleLimits(max_segments=2), SampleLimits(max_pixels=1199)):
        expected = _seen_call(SampleMeta.from_dict, json.loads(data), limits)
        assert expected[0] is SchemaError and _seen_call(parse_sample_json, data, limits) == expected
