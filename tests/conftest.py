"""Shared fixtures: the synthetic dataset and shards of it, the real sample data when present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI: subprocess ranks and Ray workers must not oversubscribe

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tiny_models, synth_shards)

from synth_shards import write_synth_shards  # noqa: E402

from pipeline import synth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

def _find_shared_data() -> Path:
    """``$USE_SHARED_DATA``, else ``../shared/data`` beside the checkout, else the workplace's copy."""
    if os.environ.get("USE_SHARED_DATA"):
        return Path(os.environ["USE_SHARED_DATA"])
    candidates = [ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_DATA = _find_shared_data()

SYNTH_IMAGES = 64  # 40 for training, 24 held out
SYNTH_TRAIN_IDS = list(range(1, 41))
SYNTH_VAL_IDS = list(range(41, 65))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """The synthetic dataset (COCO instances + captions, semantic layout) with 64 images, seed 0."""
    return synth.generate(tmp_path_factory.mktemp("synth"), SYNTH_IMAGES, seed=0)


@pytest.fixture(scope="session")
def synth_shards(synth_dir, tmp_path_factory) -> Path:
    """Shards of the 40 training images of the synthetic dataset: 5 shards of 8 samples."""
    return write_synth_shards(synth_dir, tmp_path_factory.mktemp("synth_shards"), SYNTH_TRAIN_IDS, max_samples=8)


@pytest.fixture(scope="session")
def synth_val_shards(synth_dir, tmp_path_factory) -> Path:
    """Shards of the 24 held-out images of the synthetic dataset (3 shards)."""
    return write_synth_shards(synth_dir, tmp_path_factory.mktemp("synth_val"), SYNTH_VAL_IDS, max_samples=8)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 2 CPUs with 2 fake GPUs for the module's tests (see ``job_helpers.start_ray``)."""
    import ray
    from job_helpers import start_ray

    start_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real sample data); tests that need it skip only when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_model_dir(synth_shards, tmp_path_factory) -> Path:
    """The USE model of the trainer's learning test (tiny backbones, 60 steps on the synthetic shards).

    Trained once per session and shared by the evaluation and search tests, which need a model that
    has learned the six synthetic classes. Returns the ``final/`` folder (``USEModel.from_pretrained``).
    """
    from train_helpers import config

    from trainer.cache import cache_features
    from trainer.train import train

    tmp = tmp_path_factory.mktemp("synth_model")
    cfg = config("steps=60", "data.batch_size=8", "data.workers=1", "data.max_segments_per_image=16",
                 "optim.warmup_steps=4", "log_every=10", "use_feature_cache=true", f"cache_dir={tmp / 'cache'}")
    cache_features(cfg, synth_shards, device="cpu")
    train(cfg, synth_shards, tmp / "run", device="cpu")
    return tmp / "run" / "final"
