"""SAM mask clean-up per mask, before and after the scipy connected components (issue 14, item 4).

``pipeline.sam.remove_small_regions`` (holes then islands under ``min_area``, 8-connectivity; one
``scipy.ndimage.label`` per mask and step) against the clean-up the segmenter ran before: component
sizes by repeated 3x3 min-label passes with pointer jumping on int64 labels in torch
(:func:`label_propagation_clean`, kept here verbatim as the baseline), whose pass count grows with
the longest path inside a component. Masks: a SAM-like blob (an ellipse with a hole, a notch and
small islands and holes) at 640x480 and at 12 MP (4000x3000), and a serpentine at 640x480 (one
component winding through the image: the baseline's worst case). Both must give the same mask
(asserted). segment-anything's own OpenCV clean-up is timed alongside when OpenCV is installed
(and must agree too). The baseline is stopped after ``BASELINE_CAP_S`` seconds (at 12 MP it runs for
many minutes per mask); its figure is then a lower bound and so is the speed-up. Baseline and ours
run one after the other here, not interleaved: the baseline's minutes would dwarf any load spike.
Also recorded: how many boxes one decoder slice holds under the segmenter's pixel budget.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Entry, Section, entry_table, machine, measure
from pipeline.sam import MASK_PIXEL_BUDGET, prompt_chunks, remove_small_regions

MIN_AREA = 100  # the segmenter's default min_region_area
CASES = (("640x480-blob", 480, 640, "blob", 5), ("640x480-serpentine", 480, 640, "serpentine", 3),
         ("12mp-blob", 3000, 4000, "blob", 2))
BASELINE_CAP_S = 20.0  # the baseline stops here (its figure is then a lower bound, already >= 30x at 12 MP): keeps `make bench` < 10 min


class CapReached(RuntimeError):
    pass


def blob(h: int, w: int) -> np.ndarray:
    """An ellipse with a hole and a notch, plus 1-4 px islands and holes scattered over it."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = h / 2, w / 2, h / 3, w / 3
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    mask &= ((yy - cy) / (ry / 4)) ** 2 + ((xx - cx) / (rx / 5)) ** 2 > 1
    mask[: int(cy), int(cx - rx / 10): int(cx + rx / 10)] = False
    rng = np.random.default_rng(0)
    for y, x in rng.integers(0, (h - 2, w - 2), (200, 2)):
        mask[y:y + 2, x:x + 2] ^= True
    return mask


def serpentine(h: int, w: int) -> np.ndarray:
    """Horizontal 2-px lines every 4 rows joined at alternate ends: one component of length ~ h * w / 4."""
    mask = np.zeros((h, w), bool)
    for i, y in enumerate(range(0, h - 4, 4)):
        mask[y:y + 2] = True
        x = w - 2 if i % 2 == 0 else 0
        mask[y:y + 6, x:x + 2] = True
    return mask


def label_propagation_clean(masks: torch.Tensor, min_area: int, cap_s: float = float("inf")) -> torch.Tensor:
    """The segmenter's clean-up before this change (baseline): same semantics, torch label propagation.

    Raises :class:`CapReached` once it has run ``cap_s`` seconds.
    """
    deadline = time.perf_counter() + cap_s
    holes = _component_sizes(~masks, deadline)
    masks = masks | ((holes > 0) & (holes < min_area))
    islands = _component_sizes(masks, deadline)
    largest = islands.flatten(1).max(dim=1).values[:, None, None]
    return masks & ((islands >= min_area) | (islands == largest))


def _component_sizes(masks: torch.Tensor, deadline: float) -> torch.Tensor:
    n, h, w = masks.shape
    hw = h * w
    big = hw
    index = torch.arange(hw, device=masks.device).view(1, h, w).expand(n, h, w)
    labels = torch.where(masks, index, torch.full_like(index, big))
    offsets = (torch.arange(n, device=masks.device) * hw)[:, None]
    while True:
        if time.perf_counter() > deadline:
            raise CapReached
        padded = F.pad(labels, (1, 1, 1, 1), value=big)
        neighbours = padded[:, 1:1 + h, 1:1 + w].clone()
        for dy in range(3):
            for dx in range(3):
                if (dy, dx) != (1, 1):
                    torch.minimum(neighbours, padded[:, dy:dy + h, dx:dx + w], out=neighbours)
        new = torch.where(masks, neighbours, labels)
        flat = new.view(n, hw)
        for _ in range(2):
            fg = flat < big
            flat = torch.where(fg, torch.gather(flat, 1, flat.clamp(max=hw - 1)), flat)
        new = flat.view(n, h, w)
        if torch.equal(new, labels):
            break
        labels = new
    flat = labels.reshape(n, hw)
    fg = flat < big
    global_labels = (flat + offsets)[fg]
    counts = torch.bincount(global_labels, minlength=n * hw)
    sizes = torch.zeros_like(flat)
    sizes[fg] = counts[global_labels]
    return sizes.view(n, h, w)


def _opencv_clean(mask: np.ndarray) -> np.ndarray | None:
    try:
        from segment_anything.utils.amg import remove_small_regions as sa_clean

        mask, _ = sa_clean(mask, MIN_AREA, mode="holes")
        return sa_clean(mask, MIN_AREA, mode="islands")[0]
    except ImportError:  # an install without OpenCV: the figure is left out
        return None


def run() -> Section:
    box = machine()
    entries, rows = [], ["| mask | pixels | before: label propagation (s) | after: scipy (s) | segment-anything + OpenCV (s) "
                         "| speed-up |", "|---|---:|---:|---:|---:|---:|"]
    for name, h, w, kind, repeat in CASES:
        mask = blob(h, w) if kind == "blob" else serpentine(h, w)
        ours = measure(lambda m=mask: remove_small_regions(m[None], MIN_AREA), repeat=repeat)
        try:
            base = measure(lambda m=mask: label_propagation_clean(torch.from_numpy(m[None]), MIN_AREA, BASELINE_CAP_S),
                           repeat=repeat)
            assert (base.result.numpy() == ours.result[0]).all(), f"clean-up results differ on {name}"
            base_s, base_cell = base.median, f"{base.median:.3f}"
            base_note = f"same mask as before (asserted); before {base.spread()}"
        except CapReached:
            base_s = BASELINE_CAP_S
            base_note = f"before: not finished after {BASELINE_CAP_S:.0f} s (a lower bound)"
            base_cell = f"> {BASELINE_CAP_S:.0f} (stopped)"
        cv = measure(lambda m=mask: _opencv_clean(m), repeat=repeat)
        cv_s = "n/a (no OpenCV)"
        if cv.result is not None:
            assert (cv.result == ours.result[0]).all(), f"segment-anything's clean-up differs on {name}"
            cv_s = f"{cv.median:.4f}"
        e = Entry.cost(f"sam-cleanup-{name}", base_s, ours.median, "s", 10.0,
                       f"one {w}x{h} {kind} mask, min area {MIN_AREA}; ours {ours.spread()}; {base_note}; "
                       f"segment-anything/OpenCV {cv_s} s (same mask, asserted)")
        entries.append(e)
        speedup = f"{e.ratio:.0f}x" if base_s < BASELINE_CAP_S else f">= {e.ratio:.0f}x"
        rows.append(f"| {kind} | {w}x{h} | {base_cell} | {ours.median:.4f} | {cv_s} | {speedup} |")
    per_slice = [next(iter(prompt_chunks(32, w * h, MASK_PIXEL_BUDGET, 32))) for w, h in ((640, 480), (4000, 3000))]
    budget = (f"Decoder slices under the segmenter's default `mask_pixel_budget` ({MASK_PIXEL_BUDGET} px = "
              f"{MASK_PIXEL_BUDGET * 4 >> 20} MiB of float32 logits): {per_slice[0].stop} of 32 boxes per slice at "
              f"640x480, {per_slice[1].stop} at 12 MP (before: all 32 at once, "
              f"{32 * 4000 * 3000 * 4 / 2**30:.1f} GiB of logits plus int64 labels on a 12 MP photo).")
    md = "\n".join(["## SAM mask clean-up (`benchmarks/bench_sam.py`)", "", __doc__.strip(), "",
                    f"Machine: {box.describe()}.", "", *rows, "", budget, "", *entry_table(entries)])
    return Section(md, entries)
