"""Images spread over Ray Data actors; each actor loads SAM and the USE model once.

``ray.data.from_items`` of sample indices -> ``map_batches`` over :class:`EvalActor` on an
``ActorPoolStrategy`` pool (``ray.num_actors`` actors, ``ray.num_gpus`` / ``ray.num_cpus`` each) ->
rows streamed back to the driver, which sums the confusion matrices and writes every file (so
workers need no shared file system for outputs; they do read the dataset, the checkpoint and the
proposal cache from the same paths). ``ray.address`` or ``RAY_ADDRESS`` joins a cluster, as the
curation job does; otherwise a local Ray is started.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from .config import EvalConfig
from .datasets import open_dataset
from .predict import ImageResult, load_predictor

log = logging.getLogger(__name__)


def encode_prediction(pred: np.ndarray | None) -> bytes:
    if pred is None:
        return b""
    buf = io.BytesIO()
    np.savez_compressed(buf, pred=pred.astype(np.int32))
    return buf.getvalue()


def decode_prediction(data: bytes) -> np.ndarray | None:
    if not data:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return f["pred"]


class EvalActor:
    """One Ray actor: the predictor built once, then one row per sample index."""

    def __init__(self, cfg_json: str, dataset: str, root: str, checkpoint: str, oracle: bool,
                 cache_root: str | None, keep: list[int]):
        cfg = EvalConfig.model_validate_json(cfg_json)
        self.dataset = open_dataset(dataset, root)
        self.predictor = load_predictor(cfg, self.dataset, checkpoint, oracle, cache_root)
        self.keep = set(keep)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        results, preds = [], []
        for index in batch["index"].tolist():
            res = self.predictor.evaluate(self.dataset.samples[index], keep_prediction=index in self.keep)
            res.node = self.node
            results.append(res.to_json())
            preds.append(encode_prediction(res.prediction))
        return {"index": batch["index"], "result": np.array([json.dumps(r) for r in results], dtype=object),
                "prediction": np.array(preds, dtype=object)}


def init_ray(cfg: EvalConfig) -> bool:
    """Join ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=cfg.ray.local_num_cpus, num_gpus=cfg.ray.local_num_gpus, include_dashboard=False, **quiet)
    return True


def run_on_ray(cfg: EvalConfig, dataset: str, root: str, checkpoint: str, oracle: bool, cache_root: str | None,
               indices: list[int], keep: list[int]) -> Iterator[tuple[int, ImageResult]]:
    """Evaluate ``indices`` on an actor pool; yields ``(index, result)`` as rows arrive."""
    started = init_ray(cfg)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # Ray Data hands blocks to whichever actors are up; without this wait one actor that loads first can
        # take every image while the others are still importing torch on their nodes.
        ctx.wait_for_min_actors_s = cfg.ray.start_timeout_s or -1
        ds = ray.data.from_items([{"index": i} for i in indices], override_num_blocks=max(1, len(indices)))
        ds = ds.map_batches(
            EvalActor, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "dataset": dataset, "root": root,
                                   "checkpoint": checkpoint, "oracle": oracle, "cache_root": cache_root,
                                   "keep": keep},
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
            num_gpus=cfg.ray.num_gpus or None, num_cpus=cfg.ray.num_cpus)
        for row in ds.iter_rows():
            res = ImageResult.from_json(json.loads(row["result"]))
            res.prediction = decode_prediction(row["prediction"])
            yield int(row["index"]), res
    finally:
        if started:
            ray.shutdown()
