"""``python -m evaluation``: open-vocabulary segmentation benchmarks, dataset preparation, segment search.

    python -m evaluation semseg --dataset ade20k-150 --root datasets/ADEChallengeData2016 \\
        --checkpoint outputs/demo/train/final --output outputs/eval/ade20k-150 [--oracle] \\
        [--save-predictions] [--limit N] [--config evaluation/configs/default.yaml] [key=value ...]
    python -m evaluation prepare ade20k-847 --src datasets/ADE20K_2021_17_01 [--dst DIR]
    python -m evaluation tiny-sam --out outputs/demo/tiny-sam
    python -m evaluation demo-summary --demo outputs/demo

Overrides are dotted config keys with YAML values (``sam.points_per_side=16 ray.num_actors=4``).
Exit status: 0 done, 2 bad input (one line naming what and where), 130 interrupted (rerun the same
command: finished images and SAM proposals are reused).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from shards.overrides import OverrideError

from .config import DEFAULT_CONFIG, EvalConfig
from .datasets import SPECS, DatasetError
from .datasets.prepare import PREPARERS, prepare
from .demo_summary import add_parser as add_demo_summary
from .tiny_sam import add_parser as add_tiny_sam

PROG = "python -m evaluation"


def _semseg(a: argparse.Namespace) -> int:
    from .semseg import evaluate_semseg  # torch, transformers and Ray: loaded by the command, not by --help

    cfg = EvalConfig.from_yaml(a.config, a.overrides)
    doc = evaluate_semseg(cfg, a.dataset, a.root, a.checkpoint, a.output, oracle=a.oracle,
                          save_predictions=a.save_predictions, limit=a.limit, progress=not a.quiet)
    miou = "n/a" if doc["mIoU"] is None else f"{100 * doc['mIoU']:.2f}"
    print(f"{a.dataset}: mIoU {miou} on {doc['images']} images "
          f"({len(doc['failed_images'])} failed); {a.output}/metrics.json, {a.output}/results.md")
    return 0


def _prepare(a: argparse.Namespace) -> int:
    n = prepare(a.dataset, a.src, a.dst)
    print(f"{a.dataset}: {n} label files written under {a.dst or a.src}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("semseg", help="open-vocabulary semantic segmentation mIoU of a USE checkpoint",
                       description="SAM masks (or ground-truth segments with --oracle) -> USE embeddings -> class "
                                   "probabilities -> per-pixel vote -> mIoU by detectron2's rules. Writes "
                                   "OUTPUT/metrics.json, results.md, overlays/ and, with --save-predictions, "
                                   "predictions/ in the dataset's label encoding.")
    s.add_argument("--dataset", required=True, choices=sorted(SPECS), help="benchmark")
    s.add_argument("--root", required=True, help="dataset folder (or the folder holding it)")
    s.add_argument("--checkpoint", required=True, help="USE model folder (config.json + model.safetensors) or hub id")
    s.add_argument("--output", required=True, help="run directory (results, proposal cache, per-image state)")
    s.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default {DEFAULT_CONFIG})")
    s.add_argument("--oracle", action="store_true", help="ground-truth segments as masks (classification only)")
    s.add_argument("--save-predictions", action="store_true", help="write one label file per image")
    s.add_argument("--limit", type=int, default=None, help="first N images only")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys, YAML values")
    s.set_defaults(func=_semseg)

    p = sub.add_parser("prepare", help="build a benchmark's layout from its official download",
                       description="The CAT-Seg / SED preparation of each benchmark (evaluation/datasets/prepare.py).")
    p.add_argument("dataset", choices=sorted(PREPARERS))
    p.add_argument("--src", required=True, help="the unpacked download (ADEChallengeData2016, ADE20K_2021_17_01, "
                                                "VOCdevkit/VOC2010, VOCdevkit/VOC2012)")
    p.add_argument("--dst", default=None, help="output dataset folder (default: --src, where the loaders look)")
    p.set_defaults(func=_prepare)

    add_tiny_sam(sub)
    add_demo_summary(sub)
    if importlib.util.find_spec("evaluation.search") and importlib.util.find_spec("evaluation.search.cli"):
        importlib.import_module("evaluation.search.cli").register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (DatasetError, OverrideError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue (finished images are kept)", file=sys.stderr)
        return 130
