"""Helpers of the job tests: a local Ray with fake GPUs, tiny COCO-format datasets, shard reading."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def worker_env() -> dict[str, str]:
    """Environment for Ray workers and CLI subprocesses: the tests' helper modules importable."""
    path = os.pathsep.join(p for p in (str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def kill_marked(marker: str, timeout: float = 60.0) -> int:
    """SIGKILL every process whose environment carries ``USE_TEST_RUN=marker`` and wait until they are gone.

    A killed curation driver's Ray processes (GCS, raylet, workers) do not share its process group and
    die only when they notice: a write task may still commit its shard meanwhile. Ray passes the driver's
    environment down to them, so the marker finds them all. Returns how many were killed.
    """
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("USE_TEST_RUN") == marker:
                p.kill()
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return len(procs)


def start_ray(num_gpus: int = 2) -> None:
    """Local Ray on 2 CPUs with fake GPUs (scheduling only); workers inherit ``worker_env``."""
    import ray

    os.environ.update(worker_env())
    ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, logging_level=logging.WARNING)


def square(x: int, y: int, s: int) -> list[list[float]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def write_coco(root: Path, images: dict[str, tuple[int, int] | None], *, extra_anns: list[dict] | None = None,
               captions: bool = True, declared: dict[str, tuple[int, int]] | None = None) -> dict[str, Path]:
    """A COCO dataset of ``{file_name: (width, height) or None (file written by the caller)}``:
    one square instance ("thing") per image; ``declared`` gives the JSON size of caller files
    (default: the size PIL reads). Returns the paths for a source config."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ims, anns, caps = [], [], []
    for i, (name, size) in enumerate(images.items(), start=1):
        w, h = size or (declared or {}).get(name) or Image.open(img_dir / name).size
        if size:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
        ims.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "segmentation": square(1, 1, max(1, min(w, h) // 2))})
        caps.append({"id": i, "image_id": i, "caption": "A thing on a table."})
    anns += extra_anns or []
    inst = root / "instances.json"
    inst.write_text(json.dumps({"images": ims, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    out = {"images": img_dir, "annotations": inst}
    if captions:
        out["captions"] = root / "captions.json"
        out["captions"].write_text(json.dumps({"images": ims, "annotations": caps}))
    return out


def shard_keys(out_dir: Path) -> Counter:
    """Every sample key in every committed tar (counted, to catch duplicates)."""
    keys: Counter = Counter()
    for tar in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys.update(m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json"))
    return keys
