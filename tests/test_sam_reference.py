"""Our SAM path against segment-anything itself, on one random SAM converted with our converter.

(a) the curation segmenter's box-prompt masks equal ``SamPredictor``'s (with segment-anything's own
OpenCV clean-up applied to them), and (b) ``evaluation.proposals.MaskGenerator`` equals
``SamAutomaticMaskGenerator`` with crops, NMS and the small-region clean-up all active: the same
number of masks, each matched one-to-one with IoU >= 0.99, the same predicted IoU, point and crop.

What differs and why they are not bit-identical: transformers' ``SamImageProcessor`` resizes on
a float tensor, segment-anything on a uint8 PIL image, so some input pixels differ by one grey level
(the image embeddings by ~1e-3); a pixel whose logit sits that close to 0 can flip, so IoUs are
0.996-1.0 rather than exactly 1. The order of masks whose predicted IoUs differ by less than that
noise can swap, so masks are matched rather than compared by position.

The random SAM is made to give local, confident masks (``build_tiny_segment_anything``:
``logit_gain``, smooth upscaling) and the quality thresholds are lowered, the same on both sides, so
that the filters keep some masks and drop others.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fixtures_models import make_batch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils import amg
from tiny_models import build_tiny_segment_anything

from evaluation.proposals import AMGConfig, MaskGenerator
from pipeline import sam as sam_utils
from pipeline.models import load_sam
from pipeline.record import Box, Record, records_of
from pipeline.sam_convert import convert_checkpoint
from pipeline.stages.config import SegmenterConfig
from pipeline.stages.segmenter import Segmenter
from shards import rle as rle_utils

SIZES = [(180, 240), (230, 150)]
AMG_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.01, stability_score_thresh=0.6, crop_n_layers=1,
                    min_mask_region_area=30)  # box/crop NMS at their defaults (0.7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    sam = build_tiny_segment_anything(image_size=256, logit_gain=1000.0)
    root = tmp_path_factory.mktemp("sam-reference")
    torch.save(sam.state_dict(), root / "sam_tiny.pth")
    return sam, convert_checkpoint(root / "sam_tiny.pth", root / "converted")


def _image(h: int, w: int) -> np.ndarray:
    """Flat background and four discs: regions for the masks to follow."""
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (90, 120, 200)
    yy, xx = np.mgrid[:h, :w]
    for color, (y, x, r) in zip([(250, 40, 30), (20, 220, 40), (240, 230, 60), (10, 10, 10)],
                                [(0.3, 0.3, 0.12), (0.7, 0.6, 0.15), (0.25, 0.75, 0.1), (0.75, 0.2, 0.08)], strict=True):
        img[(yy - y * h) ** 2 + (xx - x * w) ** 2 < (r * min(h, w)) ** 2] = color
    return img


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _boxes(h: int, w: int) -> np.ndarray:
    return np.array([[0.18 * w, 0.12 * h, 0.45 * w, 0.5 * h], [0.4 * w, 0.5 * h, 0.8 * w, 0.9 * h],
                     [0, 0, w, h], [0.6 * w, 0.05 * h, 0.9 * w, 0.4 * h], [3, 5, 0.3 * w, 0.95 * h]])


def _match(ours: list[dict], theirs: list[dict]) -> list[tuple[int, int, float]]:
    """One-to-one greedy matching by mask IoU: ``(ours index, theirs index, IoU)``, best pairs first."""
    ious = rle_utils.iou([p["rle"] for p in ours], [p["rle"] for p in theirs])
    pairs = []
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        pairs.append((int(i), int(j), float(ious[i, j])))
        ious[i, :] = ious[:, j] = -1
    return pairs


def test_decode_prompts_logits_equal_sam_predictor(reference):
    sam, model_dir = reference
    processor, model, _, _ = load_sam(str(model_dir), device="cpu", dtype="float32")
    for h, w in SIZES:
        img = _image(h, w)
        predictor = SamPredictor(sam)
        predictor.set_image(img)
        embeddings, originals, reshaped = sam_utils.embed_images(model, processor, [img])
        assert torch.allclose(embeddings, predictor.features, atol=1e-2)
        boxes = _boxes(h, w)
        theirs, their_iou, _ = predictor.predict_torch(
            None, None, boxes=predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), (h, w)).float(),
            multimask_output=True, return_logits=True)
        logits, iou = sam_utils.decode_prompts(model, processor, embeddings[0], originals[0], reshaped[0],
                                               boxes=boxes, multimask=True)
        assert logits.shape == theirs.shape == (len(boxes), 3, h, w)
        scale = theirs.abs().max()
        assert (logits - theirs).abs().max() < 2e-3 * scale
        assert torch.allclose(iou, their_iou, atol=1e-4)
        assert ((logits > 0) == (theirs > 0)).float().mean() > 0.999


@pytest.mark.parametrize("multimask", [False, True])
def test_segmenter_box_masks_equal_sam_predictor(reference, multimask):
    sam, model_dir = reference
    seg = Segmenter(SegmenterConfig(model=str(model_dir), device="cpu", dtype="float32", multimask=multimask,
                                    pred_iou_thresh=0, stability_score_thresh=0, min_region_area=30))
    compared = 0
    for h, w in SIZES:
        img, boxes = _image(h, w), _boxes(h, w)
        record = Record(source="t", image_id=f"{h}x{w}", boxes=[Box(list(b), f"box {i}", "test", 1.0)
                                                                 for i, b in enumerate(boxes)])
        (out,) = records_of(seg(make_batch([record], [_png(img)])))
        predictor = SamPredictor(sam)
        predictor.set_image(img)
        masks, iou, _ = predictor.predict_torch(
            None, None, boxes=predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), (h, w)).float(),
            multimask_output=multimask)
        best = iou.argmax(dim=1)
        want = []
        for i, k in enumerate(best.tolist()):  # segment-anything's own clean-up, as its mask generator runs it
            mask, _ = amg.remove_small_regions(masks[i, k].numpy(), 30, mode="holes")
            mask, _ = amg.remove_small_regions(mask, 30, mode="islands")
            want.append((mask, float(iou[i, k])))
        want = [(m, s) for m, s in want if m.any()]
        assert len(out.segments) == len(want) > 0
        for segment, (mask, score) in zip(out.segments, want, strict=True):
            got = rle_utils.decode(segment.rle)
            assert (got & mask).sum() / (got | mask).sum() >= 0.99
            assert segment.score == pytest.approx(score, abs=1e-4)
            compared += 1
    assert compared >= 6


@pytest.mark.slow
def test_mask_generator_equals_sam_automatic_mask_generator(reference):
    sam, model_dir = reference
    theirs_gen = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **AMG_SETTINGS)
    ours_gen = MaskGenerator.load(AMGConfig(model=str(model_dir), device="cpu", dtype="float32", **AMG_SETTINGS))
    from_crops = 0
    for h, w in SIZES:
        img = _image(h, w)
        theirs = [{**p, "rle": p["segmentation"]} for p in theirs_gen.generate(img)]
        ours = ours_gen.generate(img)
        assert len(ours) == len(theirs) > 0
        pairs = _match(ours, theirs)
        assert len(pairs) == len(ours)
        for i, j, iou in pairs:
            a, b = ours[i], theirs[j]
            assert iou >= 0.99, (a["bbox"], b["bbox"])
            assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
            assert a["stability_score"] == pytest.approx(b["stability_score"], abs=0.02)
            assert a["point_coords"][0] == pytest.approx(b["point_coords"][0], abs=1e-6)
            assert a["crop_box"] == b["crop_box"]
            assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
            assert a["area"] == pytest.approx(b["area"], rel=0.01)
            assert a["rle"]["size"] == [h, w] and a["area"] == int(rle_utils.decode(a["rle"]).sum())
        from_crops += sum(p["crop_box"] != [0, 0, w, h] for p in ours)
    assert from_crops > 0  # the crop path (uncropping masks, boxes and points) is exercised
