"""``python -m evaluation demo-summary --demo outputs/demo``: the key figures of ``make demo`` in one file.

Reads what each step of the demo already wrote -- the curation job's ``shards/summary.json``
(images, segments, texts), the trainer's ``train/metrics.jsonl`` (final loss), the two evaluation
runs' ``metrics.json`` (oracle and tiny-SAM mIoU) and the Makefile's ``timings.jsonl`` (wall time
per step) -- and writes ``summary.json``. A missing piece is reported as ``null`` with a note, so a
partial demo still gets a summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path}: {e}")
        return None


def summarize_demo(demo: str | Path) -> dict[str, Any]:
    demo = Path(demo)
    notes: list[str] = []
    curation = _read_json(demo / "shards" / "summary.json", notes) or {}
    final_loss = None
    try:
        rows = [json.loads(line) for line in (demo / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [r for r in rows if "loss" in r]
        final_loss = {"step": losses[-1].get("step"), "loss": losses[-1]["loss"]} if losses else None
    except (OSError, ValueError) as e:
        notes.append(f"{demo / 'train' / 'metrics.jsonl'}: {e}")
    evals = {name: _read_json(demo / f"eval-{name}" / "metrics.json", notes) or {} for name in ("oracle", "sam")}
    timings: dict[str, float] = {}
    try:
        for line in (demo / "timings.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                timings[row["stage"]] = round(float(row["seconds"]), 3)
    except (OSError, ValueError, KeyError) as e:
        notes.append(f"{demo / 'timings.jsonl'}: {e}")
    return {
        "images": curation.get("written"), "failed_images": curation.get("failed"),
        "segments": curation.get("segments"), "texts": curation.get("texts"), "shards": curation.get("shards"),
        "final_loss": final_loss,
        "oracle_mIoU": evals["oracle"].get("mIoU"), "sam_mIoU": evals["sam"].get("mIoU"),
        "eval_images": {k: v.get("images") for k, v in evals.items()},
        "eval_note": "the demo model is evaluated on the synthetic images it was trained on (the demo has no "
                     "held-out split; tests/test_eval_oracle.py measures held-out images); the SAM path uses a "
                     "tiny random SAM, so its figure shows the plumbing, not SAM's quality",
        "wall_time_s": timings, "notes": notes,
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-summary", help="gather the key figures of `make demo` into DEMO/summary.json",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="the demo folder (outputs/demo)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    summary = summarize_demo(args.demo)
    path = Path(args.demo) / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{path}: images {summary['images']}, segments {summary['segments']}, texts {summary['texts']}, "
          f"final loss {summary['final_loss'] and summary['final_loss']['loss']}, oracle mIoU {summary['oracle_mIoU']}, "
          f"SAM mIoU {summary['sam_mIoU']}")
    return 0
