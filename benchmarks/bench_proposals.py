"""Evaluation: SAM automatic-mask proposals per second with the tiny SAM (issue 8).

Ours: :class:`evaluation.proposals.MaskGenerator` as the evaluation runs it, point prompts decoded
``points_per_batch=64`` at a time (all 64 prompts of an 8-per-side grid in one forward) against the image's one embedding. Baseline: the same generator
with one point prompt per decoder forward (``points_per_batch=1``), which is what a per-prompt loop
over SAM's predictor does. Same weights, same image, same settings otherwise; both must give the
same proposals (asserted). The tiny SAM (``python -m evaluation tiny-sam``: image size 64) makes the
figure a measure of the prompt loop and post-processing, not of a ViT-H forward; the GPU suite
(``python -m benchmarks.gpu``) measures the real model. The image is an ADE20K-size 683x512 frame.

Second entry: ours against segment-anything's own ``SamAutomaticMaskGenerator`` (the reference)
on the same random weights, converted; quality filters on, at values the random weights pass in part.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import Entry, Section, compare, entry_table, machine
from evaluation.proposals import AMGConfig, MaskGenerator
from evaluation.tiny_sam import build_tiny_sam, build_tiny_segment_anything

H, W = 512, 683
POINTS_PER_SIDE = 8
#: Random tiny SAM weights pass few masks through SAM's default quality filters: lowered equally on both sides.
FILTERS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    img = np.full((H, W, 3), 200, np.uint8)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(20, 120)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return img


#: The reference comparison: a predicted-IoU threshold the random reference weights pass in part (252 of 432
#: masks here; the real default, 0.88, would keep none of them); stability off (on this image it keeps one mask).
REFERENCE = {"points_per_side": 12, "pred_iou_thresh": 0.02, "stability_score_thresh": 0.0}


def _against_segment_anything(image: np.ndarray, tmp: Path) -> tuple[Entry, str]:
    """Ours against segment-anything's ``SamAutomaticMaskGenerator`` on the same random weights (converted)."""
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    from pipeline.sam_convert import convert_checkpoint

    sam = build_tiny_segment_anything(image_size=256, logit_gain=1000.0)  # confident masks: see its docstring
    torch.save(sam.state_dict(), tmp / "sam_tiny.pth")
    ours = MaskGenerator.load(AMGConfig(model=str(convert_checkpoint(tmp / "sam_tiny.pth", tmp / "converted")),
                                        device="cpu", dtype="float32", **REFERENCE))
    theirs = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **REFERENCE)
    decoded = 3 * REFERENCE["points_per_side"] ** 2
    base, mine = compare(lambda: theirs.generate(image), lambda: ours.generate(image), repeat=3)
    assert len(base.result) == len(mine.result) > 0, "segment-anything and ours give different proposal counts"
    e = Entry.cost("eval-proposals-vs-segment-anything", base.median, mine.median, "s", None,
                   f"{decoded} masks decoded ({REFERENCE['points_per_side']}x{REFERENCE['points_per_side']} points) "
                   f"-> {len(mine.result)} proposals on a {W}x{H} image, segment-anything's tiny reference SAM "
                   f"(image size 256) and ours on its converted weights, CPU, pred_iou {REFERENCE['pred_iou_thresh']}, "
                   f"stability off; same count (asserted; tests/test_sam_reference.py "
                   f"matches each mask); segment-anything {base.spread()}, ours {mine.spread()}. Ours upscales only "
                   "masks that pass the predicted-IoU filter (segment-anything upscales every mask first)")
    line = (f"- against segment-anything's `SamAutomaticMaskGenerator` on the same weights ({decoded} masks decoded, "
            f"{len(mine.result)} proposals): {base.median:.2f} s vs ours {mine.median:.2f} s per image")
    return e, line


def run() -> Section:
    box = machine()
    image = _image()
    with tempfile.TemporaryDirectory() as tmp:
        sam_dir = build_tiny_sam(Path(tmp) / "tiny-sam")
        make = lambda ppb: MaskGenerator.load(AMGConfig(model=str(sam_dir), device="cpu", dtype="float32",  # noqa: E731
                                                        points_per_side=POINTS_PER_SIDE, points_per_batch=ppb,
                                                        **FILTERS))
        one, batched = make(1), make(64)
        base, mine = compare(lambda: one.generate(image), lambda: batched.generate(image), repeat=2)
        reference, reference_line = _against_segment_anything(image, Path(tmp))
    key = lambda props: sorted((p["rle"]["counts"], round(p["predicted_iou"], 4)) for p in props)  # noqa: E731
    assert key(base.result) == key(mine.result), "batched and one-by-one proposals differ"
    n = len(mine.result)
    prompts = POINTS_PER_SIDE ** 2
    e = Entry.rate("eval-proposals-tiny-sam", prompts / base.median, prompts / mine.median, "prompts/s", None,
                   f"{prompts} point prompts -> {n} proposals on a {W}x{H} image, tiny SAM (image size 64), CPU; "
                   f"same proposals (asserted); one prompt per forward {base.spread()}, 64 per forward "
                   f"{mine.spread()}; {n / mine.median:.1f} proposals/s")
    md = "\n".join([
        "## Evaluation: SAM automatic-mask proposals (tiny SAM)", "",
        f"{prompts} point prompts ({POINTS_PER_SIDE} per side) against one image embedding, decoded 64 per forward "
        "(ours) against one per forward (a per-prompt predictor loop); quality filters off on both sides so the "
        f"random weights give proposals. Machine: {box.describe()}.", "",
        f"- one prompt per forward: {base.median:.3f} s per image; 64 per forward: {mine.median:.3f} s per image; "
        f"{n} proposals ({n / mine.median:.1f} proposals/s)", reference_line, "", *entry_table([e, reference]), ""])
    return Section(md, [e, reference])


if __name__ == "__main__":
    print(run().markdown)
