"""``metrics.json`` and ``results.md`` of a run: the figures, per-class IoU by name, and every setting."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .metrics import Scores

#: Published figures (mIoU %, detectron2 rule) for the table's context.
PUBLISHED = {
    "USE (paper)": {"ade20k-150": 37.1, "ade20k-847": 13.4, "pc-59": 58.0, "pc-459": 15.0},
    "CAT-Seg-L": {"ade20k-150": 37.9, "ade20k-847": 16.0, "pc-59": 63.3, "pc-459": 23.8},
    "MaskCLIP++ (EVA02-L)": {"ade20k-150": 38.2, "ade20k-847": 16.8, "pc-59": 62.5, "pc-459": 23.9},
}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metrics_document(scores: Scores, names: tuple[str, ...], *, images: int, failed: list[dict],
                     settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "mIoU": _num(scores.mIoU), "mAcc": _num(scores.mAcc), "pAcc": _num(scores.pAcc), "fwIoU": _num(scores.fwIoU),
        "mIoU_mmseg": _num(scores.mIoU_mmseg),
        "metric_rule": "detectron2 SemSegEvaluator (fractions; IoU over classes with ground truth); "
                       "mIoU_mmseg: mmsegmentation IoUMetric",
        "images": images, "failed_images": failed,
        "classes_with_gt": int((scores.gt_pixels > 0).sum()), "num_classes": len(names),
        "per_class_iou": {n: _num(v) for n, v in zip(names, scores.iou, strict=True)},
        "per_class_acc": {n: _num(v) for n, v in zip(names, scores.acc, strict=True)},
        "settings": settings,
    }


def results_table(doc: dict[str, Any], dataset: str, top: int = 15) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    s = doc["settings"]
    lines = [f"# {dataset}: open-vocabulary semantic segmentation", "",
             f"{doc['images']} images ({len(doc['failed_images'])} failed), masks: {s['masks']}, "
             f"checkpoint `{s['checkpoint']}`.", "",
             "| mIoU | mAcc | pAcc | fwIoU | mIoU (mmseg rule) |", "|---|---|---|---|---|",
             f"| {pct(doc['mIoU'])} | {pct(doc['mAcc'])} | {pct(doc['pAcc'])} | {pct(doc['fwIoU'])} | "
             f"{pct(doc['mIoU_mmseg'])} |", ""]
    peers = [(name, figs[dataset]) for name, figs in PUBLISHED.items() if dataset in figs]
    if peers:
        lines += ["Published mIoU on the full benchmark (detectron2 rule): "
                  + ", ".join(f"{n} {v}" for n, v in peers) + ".", ""]
    defined = sorted(((v, n) for n, v in doc["per_class_iou"].items() if v is not None), reverse=True)
    if defined:
        lines += [f"| class (best {min(top, len(defined))}) | IoU |", "|---|---|"]
        lines += [f"| {n} | {pct(v)} |" for v, n in defined[:top]]
        lines.append("")
    lines += ["Settings: prompts " + json.dumps(s["prompts"]) + ", resize " + json.dumps(s["resize"])
              + f", uncovered pixels: {s['aggregate']['uncovered']}.", ""]
    return "\n".join(lines)
