"""Segmenter on a tiny SAM: box scaling, mask geometry on non-square images, filters, clean-up, RLE segments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_models import image_bytes, make_batch, tiny_model_dirs
from scipy import ndimage

from pipeline.record import Box, Record, records_of
from pipeline.stages.config import SegmenterConfig
from pipeline.stages.segmenter import Segmenter
from shards import rle as rle_utils
from shards.schema import Segment, Text

LOW = 16  # the tiny SAM's low-resolution mask side (4x its 4x4 image embedding)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), min_region_area=0))


def _low_res(*rects: tuple[int, int, int, int], value: float = 10.0) -> torch.Tensor:
    """A ``(LOW, LOW)`` logit map, ``value`` inside the ``(r0, r1, c0, c1)`` rectangles and ``-value`` outside."""
    m = torch.full((LOW, LOW), -value)
    for r0, r1, c0, c1 in rects:
        m[r0:r1, c0:c1] = value
    return m


def _patch_decoder(monkeypatch, segmenter, masks: torch.Tensor, iou: list[float]):
    """Make the mask decoder return ``masks`` ``(k, LOW, LOW)`` and ``iou`` ``(k,)`` for every box."""
    seen = {}

    def decoder(image_embeddings, sparse_prompt_embeddings, multimask_output, **kwargs):
        seen["multimask"] = multimask_output
        b, n = sparse_prompt_embeddings.shape[:2]
        return masks.expand(b, n, *masks.shape).clone(), torch.tensor(iou).expand(b, n, len(iou)).clone()

    monkeypatch.setattr(segmenter.model.mask_decoder, "forward", decoder)
    return seen


def _run(segmenter, records, images):
    return records_of(segmenter(make_batch(records, images)))


def _record(i, boxes, **kw):
    return Record(source="t", image_id=str(i), boxes=[Box(b, f"thing {j}", "llava:objects", 0.4)
                                                      for j, b in enumerate(boxes)], **kw)


@pytest.mark.parametrize(("h", "w", "low_rect", "expected"), [
    # 48x96 -> 32x64 inside the 64x64 padded input: valid low-res rows 0..8, columns 0..16
    (48, 96, (2, 6, 4, 12), (12, 36, 24, 72)),
    # 96x48 -> 64x32: valid low-res rows 0..16, columns 0..8
    (96, 48, (4, 12, 2, 6), (24, 72, 12, 36)),
])
def test_low_res_mask_lands_on_the_right_pixels(segmenter, monkeypatch, h, w, low_rect, expected):
    _patch_decoder(monkeypatch, segmenter, _low_res(low_rect)[None], [0.9])
    (out,) = _run(segmenter, [_record(0, [[0, 0, w, h]])], [image_bytes(w, h)])
    assert out.failure is None and len(out.segments) == 1
    seg = out.segments[0]
    mask = rle_utils.decode(seg.rle)
    assert mask.shape == (h, w) and seg.rle["size"] == [h, w]
    r0, r1, c0, c1 = expected
    want = np.zeros((h, w), bool)
    want[r0:r1, c0:c1] = True
    corners = np.array([[r, c] for r in (r0, r1 - 1) for c in (c0, c1 - 1)])
    for pixel in np.argwhere(mask ^ want):  # bilinear upscaling only rounds the corners
        assert np.abs(corners - pixel).max(axis=1).min() <= 1, pixel
    assert seg.bbox == pytest.approx([c0, r0, c1 - c0, r1 - r0], abs=1)
    assert seg.area == int(mask.sum())
    # the classic padding bug (upscaling the padded 16x16 straight to h x w) would put it elsewhere
    naive = torch.nn.functional.interpolate(_low_res(low_rect)[None, None], (h, w), mode="bilinear")[0, 0] > 0
    assert (naive.numpy() & want).sum() < 0.6 * want.sum()


def test_boxes_are_scaled_to_the_model_input(segmenter, monkeypatch):
    seen = {}
    forward = segmenter.model.prompt_encoder.forward

    def spy(**kwargs):
        seen["boxes"] = kwargs["input_boxes"].clone()
        return forward(**kwargs)

    monkeypatch.setattr(segmenter.model.prompt_encoder, "forward", spy)
    _run(segmenter, [_record(0, [[24, 12, 72, 36], [0, 0, 96, 48]])], [image_bytes(96, 48)])
    assert seen["boxes"].tolist() == [[[16, 8, 48, 24], [0, 0, 64, 32]]]  # longest side 96 -> 64


def test_multimask_keeps_the_best_by_predicted_iou(monkeypatch):
    seg = Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), multimask=True, min_region_area=0))
    masks = torch.stack([_low_res((0, 2, 0, 2)), _low_res((2, 6, 4, 12)), _low_res((0, 8, 0, 16))])
    seen = _patch_decoder(monkeypatch, seg, masks, [0.2, 0.95, 0.5])
    (out,) = _run(seg, [_record(0, [[0, 0, 96, 48]])], [image_bytes(96, 48)])
    assert seen["multimask"] is True
    assert out.segments[0].score == pytest.approx(0.95)
    assert out.segments[0].bbox == pytest.approx([24, 12, 48, 24], abs=1)


def test_segments_keep_texts_annotations_and_ids(segmenter, monkeypatch):
    seen = _patch_decoder(monkeypatch, segmenter, _low_res((2, 6, 4, 12))[None], [0.9])
    annotation = Segment(id=7, rle=rle_utils.encode_one(np.ones((48, 96), bool)), bbox=[0, 0, 96, 48],
                         area=96 * 48, texts=[Text("wall", "coco", 1.0)], score=1.0)
    rec = _record(0, [[0, 0, 96, 48], [10, 10, 40, 40]], segments=[annotation])
    (out,) = _run(segmenter, [rec], [image_bytes(96, 48)])
    assert seen["multimask"] is False
    assert [s.id for s in out.segments] == [7, 8, 9]
    assert out.segments[0] == annotation
    assert out.segments[2].texts == [Text("thing 1", "llava:objects", 0.4)]
    assert out.segments[2].score == pytest.approx(0.9)


def test_quality_filters_and_failures(segmenter, monkeypatch):
    _patch_decoder(monkeypatch, segmenter, _low_res((2, 6, 4, 12))[None], [0.5])  # predicted IoU under 0.7
    failed = _record(3, [[0, 0, 9, 9]])
    failed.fail("grounder", "no box above threshold")
    out = _run(segmenter, [_record(0, [[0, 0, 96, 48]]), Record(source="t", image_id="1"),
                           _record(2, [[0, 0, 9, 9]]), failed],
               [image_bytes(96, 48), image_bytes(20, 20), b"", image_bytes(20, 20)])
    assert (out[0].failure.stage, out[0].failure.error) == ("segmenter", "no non-empty mask passed the filters")
    assert out[1].failure.error == "no box to segment"
    assert out[2].failure.stage == "segmenter" and "empty image data" in out[2].failure.error
    assert out[3].failure.stage == "grounder"
    # unstable: logits barely above the threshold everywhere inside
    _patch_decoder(monkeypatch, segmenter, _low_res((2, 6, 4, 12), value=0.5)[None], [0.99])
    (out,) = _run(segmenter, [_record(0, [[0, 0, 96, 48]])], [image_bytes(96, 48)])
    assert out.failure is not None and out.failure.stage == "segmenter"
    # an empty mask is dropped, not written
    _patch_decoder(monkeypatch, segmenter, _low_res()[None], [0.99])
    (out,) = _run(segmenter, [_record(0, [[0, 0, 96, 48]])], [image_bytes(96, 48)])
    assert out.segments == [] and out.failure.stage == "segmenter"


def test_a_failing_image_fails_alone(segmenter, monkeypatch):
    _patch_decoder(monkeypatch, segmenter, _low_res((2, 6, 4, 12))[None], [0.9])
    decoder = segmenter.model.mask_decoder.forward

    def flaky(sparse_prompt_embeddings, **kwargs):
        if sparse_prompt_embeddings.shape[1] == 3:
            raise RuntimeError("CUDA out of memory")
        return decoder(sparse_prompt_embeddings=sparse_prompt_embeddings, **kwargs)

    monkeypatch.setattr(segmenter.model.mask_decoder, "forward", flaky)
    records = [_record(0, [[0, 0, 96, 48]]), _record(1, [[0, 0, 9, 9]] * 3), _record(2, [[0, 0, 96, 48]])]
    out = _run(segmenter, records, [image_bytes(96, 48)] * 3)
    assert [len(r.segments) for r in out] == [1, 0, 1]
    assert out[1].failure.stage == "segmenter" and "out of memory" in out[1].failure.error
    assert out[0].failure is None and out[2].failure is None


def test_small_islands_and_holes_are_removed(monkeypatch):
    seg = Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), min_region_area=100))
    low = _low_res((2, 7, 2, 12), (10, 11, 14, 15))  # a rectangle and a one-cell island (~36 px)...
    low[4, 6] = -10.0  # ...and a one-cell hole
    _patch_decoder(monkeypatch, seg, low[None], [0.9])
    (out,) = _run(seg, [_record(0, [[0, 0, 96, 96]])], [image_bytes(96, 96)])
    mask = rle_utils.decode(out.segments[0].rle)
    labels, n = ndimage.label(mask)
    assert n == 1 and not ndimage.binary_fill_holes(mask)[~mask].any()
    assert mask[60:66, 84:90].sum() == 0 and mask[24:30, 36:42].all()


def test_boxes_are_decoded_within_the_pixel_budget(monkeypatch):
    """Upscaled logits of one decoder forward stay under mask_pixel_budget; the segments do not change."""
    records = lambda: [_record(0, [[0, 0, 40, 30], [5, 5, 20, 20], [10, 0, 30, 10], [0, 0, 96, 48], [1, 1, 9, 9]])]  # noqa: E731
    whole = Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), pred_iou_thresh=0, stability_score_thresh=0,
                                      min_region_area=10))
    (want,) = _run(whole, records(), [image_bytes(96, 48)])
    sliced = Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), pred_iou_thresh=0, stability_score_thresh=0,
                                       min_region_area=10, mask_pixel_budget=2 * 96 * 48 + 5))
    calls = []
    decoder = sliced.model.mask_decoder.forward

    def spy(**kwargs):
        calls.append(kwargs["sparse_prompt_embeddings"].shape[1])
        return decoder(**kwargs)

    monkeypatch.setattr(sliced.model.mask_decoder, "forward", spy)
    (got,) = _run(sliced, records(), [image_bytes(96, 48)])
    assert calls == [2, 2, 1]
    assert len(got.segments) == len(want.segments) > 0
    for a, b in zip(got.segments, want.segments, strict=True):  # batch size moves float rounding, no more
        assert a.score == pytest.approx(b.score, abs=1e-5) and a.texts == b.texts
        assert rle_utils.iou([a.rle], [b.rle])[0, 0] > 0.99


def test_real_tiny_forward():
    seg = Segmenter(SegmenterConfig(model=str(tiny_model_dirs().sam), pred_iou_thresh=0, stability_score_thresh=0,
                                    min_region_area=0, boxes_per_batch=2, image_batch_size=2))
    records = [_record(i, [[0, 0, 40, 30], [5, 5, 20, 20], [10, 0, 30, 10]]) for i in range(3)]
    out = _run(seg, records, [image_bytes(64, 30), image_bytes(30, 70), image_bytes(50, 50)])
    sizes = [(30, 64), (70, 30), (50, 50)]
    for r, (h, w) in zip(out, sizes, strict=True):
        assert r.failure is None or r.failure.error == "no non-empty mask passed the filters"
        for s in r.segments:
            assert s.rle["size"] == [h, w] and s.area == int(rle_utils.decode(s.rle).sum()) > 0
    assert sum(len(r.segments) for r in out) > 0
