"""``python -m evaluation semseg``: a trained USE model measured on an open-vocabulary segmentation benchmark.

The run directory is the state. ``per_image/<run fingerprint>/<key>.json`` holds each image's
confusion cells as soon as it is done (atomic writes), and SAM proposals are cached in
``proposals/`` (or ``proposal_cache``), so a killed run restarted with the same command evaluates
only the images it had not finished; the fingerprint covers the checkpoint's weights, the dataset
and every setting that changes a prediction, so a changed setting never reuses stale results.
At the end: ``metrics.json``, ``results.md``, ``overlays/`` (first ``overlays`` images) and, with
``--save-predictions``, ``predictions/<stem>.png|tif`` in the dataset's own label encoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.models import resolve

from .classify import resolve_templates
from .config import EvalConfig
from .datasets import SemSegDataset, open_dataset
from .distributed import run_on_ray
from .images import read_rgb
from .metrics import ConfusionMatrix
from .overlays import save_overlay
from .predict import ImageResult, Predictor, load_predictor
from .proposals import weights_identity
from .report import atomic_write, metrics_document, results_table

log = logging.getLogger(__name__)

#: Settings that change no prediction (where and how the work runs); left out of the run fingerprint.
_NOT_FINGERPRINTED = {"device": True, "overlays": True, "ray": True, "proposal_cache": True, "embed_batch_size": True,
                      "sam": {"device", "models_dir", "points_per_batch", "crop_batch_size", "mask_pixel_budget"},
                      "prompts": {"text_batch_size"}}


def run_fingerprint(cfg: EvalConfig, dataset: SemSegDataset, checkpoint_id: str, oracle: bool) -> str:
    settings = cfg.model_dump(exclude=_NOT_FINGERPRINTED)
    if oracle:
        settings.pop("sam"), settings.pop("resize")
    payload = {"checkpoint": checkpoint_id, "dataset": dataset.name, "layout": dataset.layout,
               "oracle": oracle, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_identity(checkpoint: str) -> str:
    """A content hash of a local model folder; a hub id stands for itself."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint}: no config.json (a USE model folder holds config.json "
                                    "and model.safetensors, e.g. outputs/demo/train/final)")
        return weights_identity(path)
    if path.exists() or str(checkpoint).startswith((".", "/", "~")) or str(checkpoint).count("/") != 1:
        raise FileNotFoundError(f"checkpoint {checkpoint}: not a model folder (config.json + model.safetensors); "
                                "train one with `make train` or `make demo`")
    return f"hub:{checkpoint}"


def _load_done(folder: Path, keys: set[str]) -> dict[str, ImageResult]:
    done: dict[str, ImageResult] = {}
    if not folder.is_dir():
        return done
    for path in folder.glob("*.json"):
        try:
            d = json.loads(path.read_text())
            if d["key"] in keys and not d["error"]:
                done[d["key"]] = ImageResult.from_json(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable per-image result %s: %s", path, e)
    return done


def evaluate_semseg(cfg: EvalConfig, dataset_name: str, root: str | Path, checkpoint: str, output: str | Path, *,
                    oracle: bool = False, save_predictions: bool = False, limit: int | None = None,
                    predictor: Predictor | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark and write the run directory; returns the ``metrics.json`` document.

    ``predictor`` (tests, notebooks) evaluates in this process with an already built predictor.
    """
    started = time.time()
    dataset = open_dataset(dataset_name, root)
    samples = dataset.samples[:limit] if limit else dataset.samples
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if predictor is None:
        checkpoint_id = checkpoint_identity(checkpoint)
        if not oracle:
            resolve(cfg.sam.model, cfg.sam.models_dir)  # missing SAM weights: one error now, not in every actor
    else:
        checkpoint_id = f"in-process:{type(predictor.model).__name__}:{checkpoint}"
    fp = run_fingerprint(cfg, dataset, checkpoint_id, oracle)
    results_dir = out / "per_image" / fp
    cache_root = str(Path(cfg.proposal_cache or out / "proposals").resolve())
    keys = {s.key for s in samples}
    done = _load_done(results_dir, keys)
    overlay_keys = {s.key for s in samples[: cfg.overlays]}
    todo = [i for i, s in enumerate(dataset.samples[: len(samples)]) if s.key not in done]
    keep = [i for i in todo if save_predictions or dataset.samples[i].key in overlay_keys]
    if done:
        log.info("reusing %d per-image results in %s; %d images to go", len(done), results_dir, len(todo))

    cm = ConfusionMatrix(dataset.num_classes)
    for res in done.values():
        res.add_to(cm)
    failed: list[dict] = []
    stream: Iterator[tuple[int, ImageResult]]
    if predictor is not None or not cfg.ray.enabled:
        pred = predictor or load_predictor(cfg, dataset, checkpoint, oracle, cache_root)
        kept = set(keep)
        stream = ((i, pred.evaluate(dataset.samples[i], keep_prediction=i in kept)) for i in todo)
    else:
        stream = run_on_ray(cfg, dataset_name, str(Path(root).resolve()), _absolute(checkpoint), oracle, cache_root,
                            todo, keep) if todo else iter(())
    for i, res in tqdm(stream, total=len(todo), desc=f"{dataset_name}", unit="img", disable=not progress):
        sample = dataset.samples[i]
        if res.error:
            log.error("%s: %s", sample.image, res.error)
            failed.append({"key": res.key, "error": res.error})
            continue
        res.add_to(cm)
        atomic_write(results_dir / f"{sample.key}.json", json.dumps(res.to_json()))
        if res.prediction is not None:
            _write_outputs(out, dataset, sample, res, save_predictions, sample.key in overlay_keys)

    scores = cm.scores()
    settings = {
        "dataset": dataset_name, "root": str(root), "layout": dataset.layout, "checkpoint": str(checkpoint),
        "masks": "oracle (ground-truth segments, one per class)" if oracle else "SAM automatic mask generation",
        "oracle": oracle, "limit": limit, "class_source": dataset.classes.source,
        "prompts": {**cfg.prompts.model_dump(exclude={"text_batch_size"}),
                    "templates_used": len(resolve_templates(cfg.prompts.templates))},
        "resize": ({"oracle": "ground-truth resolution"} if oracle else
                   {**cfg.resize.model_dump(), "scored_at": "ground-truth resolution (nearest resize back)"}),
        "aggregate": cfg.aggregate.model_dump(), "sam": None if oracle else cfg.sam.model_dump(),
        "run_fingerprint": fp, "wall_time_s": round(time.time() - started, 2),
    }
    doc = metrics_document(scores, dataset.classes.names, images=len(samples) - len(failed), failed=failed,
                           settings=settings)
    atomic_write(out / "metrics.json", json.dumps(doc, indent=1) + "\n")
    atomic_write(out / "results.md", results_table(doc, dataset_name))
    return doc


def _absolute(checkpoint: str) -> str:
    path = Path(checkpoint)
    return str(path.resolve()) if path.exists() else checkpoint


def _write_outputs(out: Path, dataset: SemSegDataset, sample, res: ImageResult, save_predictions: bool,
                   overlay: bool) -> None:
    if save_predictions:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        dataset.encoding.save(res.prediction, out / "predictions" / sample.key)
    if overlay:
        save_overlay(out / "overlays" / f"{sample.key}.png", read_rgb(sample.image), dataset.load_label(sample),
                     res.prediction, dataset.classes.names)
