"""The pipeline's record speaks the shard schema: typed captions/segments/texts, and the sample the
writer stores comes from ``Record.to_sample_meta`` under the current ``SCHEMA_VERSION``."""

from __future__ import annotations

import numpy as np
import pytest

import shards.schema
from pipeline import record as record_module
from pipeline.record import Box, Phrase, Record
from shards import rle as rle_utils
from shards.schema import Caption, SampleMeta, SchemaError, Segment, Text


def _record() -> Record:
    mask = np.zeros((12, 20), dtype=bool)
    mask[2:8, 3:11] = True
    rle = rle_utils.encode_one(mask)
    return Record(source="coco", image_id="7", width=20, height=12, image_ext="png", file_name="7.png",
                  captions=[Caption("A man on a horse.", "coco")], phrases=[Phrase("a man", "caption:coco")],
                  boxes=[Box([3.0, 2.0, 11.0, 8.0], "a man", "caption:coco", 0.8)],
                  segments=[Segment(id=0, rle=rle, bbox=[3.0, 2.0, 8.0, 6.0], area=48,
                                    texts=[Text("a man", "caption:coco", 0.8)], score=0.9)])


def test_json_round_trip_gives_the_schema_types():
    rec = _record()
    back = Record.from_json(rec.to_json())
    assert back == rec
    assert isinstance(back.captions[0], Caption) and isinstance(back.segments[0], Segment)
    assert isinstance(back.segments[0].texts[0], Text)


def test_to_sample_meta_is_what_the_reader_parses():
    rec = _record()
    meta = rec.to_sample_meta("coco_7")
    assert meta == SampleMeta.from_dict(meta.to_dict())
    assert meta.key == "coco_7" and meta.segments == rec.segments and meta.captions == rec.captions
    assert meta.schema_version == shards.schema.SCHEMA_VERSION


def test_a_schema_bump_does_not_fail_every_sample(monkeypatch):
    """The version comes from ``shards.schema``, not a literal: after a bump samples still pass the check."""
    bumped = shards.schema.SCHEMA_VERSION + 1
    monkeypatch.setattr(shards.schema, "SCHEMA_VERSION", bumped)
    monkeypatch.setattr(record_module, "SCHEMA_VERSION", bumped)
    assert _record().to_sample_meta("coco_7").segments[0].texts[0].text == "a man"


def test_a_sample_the_validator_would_refuse_raises_naming_the_field():
    rec = _record()
    rec.segments[0].texts = []
    with pytest.raises(SchemaError, match=r"segments\[0\] has no texts"):
        rec.to_sample_meta("coco_7")
