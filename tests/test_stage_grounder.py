"""Grounder on a tiny Grounding DINO: prompt packing, pixel geometry and phrase mapping with controlled outputs."""

from __future__ import annotations

import pytest
import torch
from fixtures_models import image_bytes, make_batch, tiny_model_dirs
from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

from pipeline.nms import mask_nms
from pipeline.record import Box, Phrase, Record, records_of
from pipeline.stages.config import GrounderConfig, SegmenterConfig
from pipeline.stages.grounder import Grounder, prompt_phrase
from pipeline.stages.segmenter import Segmenter

PHRASES = ["a man in a red shirt", "a brown horse", "a wooden fence", "the sky", "a big tree near the road",
           "a blue car", "a small dog", "the kitchen table", "a white cup on the table", "a green boat on the water",
           "a black bird", "the window"]
LONG = ("a man with a red hat and a blue shirt near a big green tree next to the road with a small white dog "
        "and a black cat in the street")
DOT = 1012  # BERT's "." id, the phrase separator Grounding DINO hard-codes


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder(GrounderConfig(model=str(tiny_model_dirs().grounding_dino)))


def _record(i: int, phrases: list[str], **kw) -> Record:
    return Record(source="t", image_id=str(i), phrases=[Phrase(p, "llava:objects", "caption") for p in phrases], **kw)


def _spans(ids: list[int]) -> list[tuple[int, int]]:
    """Phrase token ranges of one prompt: between [CLS]/"." and the next "."/[SEP], computed independently."""
    cuts = [k for k, t in enumerate(ids) if t in (101, 102, DOT)]
    return [(a + 1, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a + 1]


def _fake_forward(grounder: Grounder, plan):
    """A patched forward: ``plan(row, input_ids, spans)`` returns ``[(token logits by span, cxcywh)]`` per query."""
    max_len = grounder.model.config.max_text_len
    calls = []

    def forward(input_ids, attention_mask, pixel_values, **kwargs):
        b, length = input_ids.shape
        logits = torch.full((b, 6, max_len), -10.0)
        logits[:, :, length:] = float("-inf")
        boxes = torch.full((b, 6, 4), 0.5)
        for row in range(b):
            ids = input_ids[row][attention_mask[row].bool()].tolist()
            spans = _spans(ids)
            calls.append((ids, spans))
            for q, (span_logits, cxcywh) in enumerate(plan(row, ids, spans)):
                for (s, e), value in zip(spans, span_logits, strict=False):
                    logits[row, q, s:e] = value
                boxes[row, q] = torch.tensor(cxcywh)
        return GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes)

    return forward, calls


def test_text_limit_is_capped_at_the_model(grounder):
    assert grounder.config.max_text_tokens == 256 and grounder.max_tokens == 32


def test_packing_by_tokenizer_length(grounder):
    record = _record(0, [*PHRASES, LONG, "st. mary's church?"])
    packed = grounder.pack(record)
    assert [i for _, ids in packed for i in ids] == list(range(len(PHRASES) + 2))  # each once, in order
    assert len(packed) >= 3
    for text, ids in packed:
        assert text == " . ".join(prompt_phrase(record.phrases[i].text) for i in ids) + " ."
        n = len(grounder.tokenizer(text)["input_ids"])
        assert n <= grounder.max_tokens or ids == [len(PHRASES)]  # only the long phrase, alone, is truncated
    assert packed[-1][0] == "st mary's church ."
    assert len(grounder.tokenizer(packed[-2][0])["input_ids"]) > grounder.max_tokens


@pytest.mark.parametrize("sizes", [[(40, 80), (70, 30)], [(64, 64), (33, 121)]])
def test_boxes_come_back_in_pixels_of_each_image(grounder, monkeypatch, sizes):
    forward, _ = _fake_forward(grounder, lambda row, ids, spans: [([-10.0, 5.0], (0.5, 0.25, 0.2, 0.1))])
    monkeypatch.setattr(grounder.model, "forward", forward)
    records = [_record(i, ["a man", "a brown horse"]) for i in range(len(sizes))]
    out = records_of(grounder(make_batch(records, [image_bytes(w, h) for h, w in sizes])))
    for (h, w), r in zip(sizes, out, strict=True):
        assert r.failure is None and len(r.boxes) == 1
        box = r.boxes[0]
        assert box.xyxy == pytest.approx([0.4 * w, 0.2 * h, 0.6 * w, 0.3 * h], abs=1e-3)
        assert (box.text, box.source) == ("a brown horse", "llava:objects")
        assert box.score == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-5)
        assert (r.width, r.height) == (w, h)


def test_each_box_maps_back_to_its_phrase_across_chunks(grounder, monkeypatch):
    expected = []

    def plan(row, ids, spans):
        text = grounder.tokenizer.decode(ids, skip_special_tokens=True)
        words = [w.strip() for w in text.split(".") if w.strip()]
        last = len(spans) - 1
        expected.append(words[last])
        queries = [([-10.0] * last + [4.0], (0.5, 0.5, 0.4, 0.4))]
        if len(spans) >= 2:  # only the phrase above the text threshold (sigmoid(-3) = 0.05 < 0.2)
            queries.append(([-3.0, 3.0], (0.3, 0.3, 0.2, 0.2)))
            expected.append(words[1])
        return queries

    forward, calls = _fake_forward(grounder, plan)
    monkeypatch.setattr(grounder.model, "forward", forward)
    (out,) = records_of(grounder(make_batch([_record(0, [*PHRASES, LONG])], [image_bytes(90, 60)])))
    assert len(calls) >= 3 and all(len(ids) <= grounder.max_tokens for ids, _ in calls)
    assert sorted(b.text for b in out.boxes) == sorted(
        next(p for p in [*PHRASES, LONG] if p.startswith(e)) for e in expected)
    assert LONG in {b.text for b in out.boxes}  # truncated in its prompt, still mapped to itself


def test_every_phrase_above_the_text_threshold_gets_the_box_and_reaches_the_segment(grounder, monkeypatch):
    """One query scoring 0.95 on "a man in a red shirt" and 0.92 on "the man" (not on the horse):
    both phrases are texts of the one final segment after SAM and mask NMS."""
    logit = lambda p: float(torch.logit(torch.tensor(p)))  # noqa: E731
    forward, _ = _fake_forward(grounder, lambda row, ids, spans: [
        ([logit(0.95), logit(0.92), logit(0.1)], (0.5, 0.5, 0.5, 0.5))])
    monkeypatch.setattr(grounder.model, "forward", forward)
    image = image_bytes(64, 48)
    (out,) = records_of(grounder(make_batch([_record(0, ["a man in a red shirt", "the man", "a brown horse"])],
                                            [image])))
    assert [(b.text, round(b.score, 4)) for b in out.boxes] == [("a man in a red shirt", 0.95), ("the man", 0.92)]
    assert out.boxes[0].xyxy == out.boxes[1].xyxy == pytest.approx([16, 12, 48, 36], abs=1e-3)
    segmenter = Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), pred_iou_thresh=0,
                                          stability_score_thresh=0, min_region_area=0, mask_threshold=-1e4))
    (seg,) = records_of(segmenter(make_batch([out], [image])))
    assert seg.failure is None and len(seg.segments) == 2
    (final,) = mask_nms(seg.segments, 0.9)
    assert [(t.text, t.source, round(t.score, 4)) for t in final.texts] == [
        ("a man in a red shirt", "llava:objects", 0.95), ("the man", "llava:objects", 0.92)]


def test_no_box_above_threshold_and_annotation_boxes(grounder, monkeypatch):
    forward, _ = _fake_forward(grounder, lambda row, ids, spans: [])
    monkeypatch.setattr(grounder.model, "forward", forward)
    vg_box = Box([1, 2, 10, 12], "a cloud", "vg")
    records = [_record(0, ["a dog"]), _record(1, ["a dog"], boxes=[vg_box]), Record(source="vg", image_id="2",
               boxes=[vg_box]), Record(source="t", image_id="3"), _record(4, ["a dog"])]
    records[4].fail("captioner", "boom")
    out = records_of(grounder(make_batch(records, [image_bytes(40, 40)] * 5)))
    assert (out[0].failure.stage, out[0].failure.error) == ("grounder", "no box above threshold")
    assert out[1].failure is None and out[1].boxes == [vg_box]
    assert out[2].failure is None and out[2].boxes == [vg_box]
    assert out[3].failure.error == "no phrase to ground"
    assert out[4].failure.stage == "captioner"


def test_a_failing_prompt_fails_only_its_image(grounder, monkeypatch):
    cat = grounder.tokenizer.convert_tokens_to_ids("cat")
    forward, _ = _fake_forward(grounder, lambda row, ids, spans: [([5.0], (0.5, 0.5, 0.5, 0.5))])

    def flaky(input_ids, **kwargs):
        if (input_ids == cat).any():
            raise RuntimeError("CUDA out of memory")
        return forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(grounder.model, "forward", flaky)
    out = records_of(grounder(make_batch([_record(0, ["a dog"]), _record(1, ["a cat"]), _record(2, ["a car"])],
                                         [image_bytes(40, 40)] * 3)))
    assert [len(r.boxes) for r in out] == [1, 0, 1]
    assert out[1].failure.stage == "grounder" and "out of memory" in out[1].failure.error
    assert out[0].failure is None and out[2].failure is None


def test_real_tiny_forward_and_a_bad_image():
    grounder = Grounder(GrounderConfig(model=str(tiny_model_dirs().grounding_dino), box_threshold=0.0,
                                       text_threshold=0.0, min_box_side=0.0, max_boxes_per_image=5))
    records = [_record(0, PHRASES), _record(1, ["a dog"])]
    out = records_of(grounder(make_batch(records, [image_bytes(80, 50), b"\x00" * 100])))
    assert out[0].failure is None and 0 < len(out[0].boxes) <= 5
    for box in out[0].boxes:
        x0, y0, x1, y1 = box.xyxy
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 50
        assert box.text in PHRASES and 0 <= box.score <= 1
    assert out[1].failure.stage == "grounder" and "not an image" in out[1].failure.error
