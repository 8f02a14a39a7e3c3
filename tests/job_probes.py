"""Stand-in stages for job tests: plugged in with ``impl.<stage>=job_probes:Class`` (no model code).

They exercise the job's scheduling and fault paths the way real stages would: ``DeviceProbe``
records the ``CUDA_VISIBLE_DEVICES`` Ray gave its actor (in a file per actor under
``$USE_PROBE_DIR`` and as a caption on each row it handles); ``SlowProbe`` makes a job last long
enough to be killed mid-run; ``FlakyProbe`` raises for some rows to test row-by-row isolation;
``KillProbe`` and ``HangProbe`` kill their own process or hang on one image (stage crashes).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from pipeline.record import records_of, with_records
from shards.schema import Caption


class DeviceProbe:
    def __init__(self, config):
        self.tag = type(config).__name__
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        probe_dir = os.environ.get("USE_PROBE_DIR")
        if probe_dir:
            Path(probe_dir, f"{self.tag}-{os.getpid()}.txt").write_text(self.devices)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        for r in records:
            r.captions.append(Caption(f"{self.tag} cuda={self.devices}", "probe"))
        return with_records(batch, records)


class SlowProbe:
    def __init__(self, config):
        self.delay = float(os.environ.get("USE_PROBE_DELAY", "0.1"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay * len(batch["key"]))
        return batch


class FlakyProbe:
    """Raises on any batch that holds a key ending in ``_3`` (so only that row should fail)."""

    def __init__(self, config):
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = [str(k) for k in batch["key"] if str(k).endswith("_3")]
        if bad:
            raise RuntimeError(f"probe refuses {bad}")
        return batch


class ConfigProbe:
    """Writes the config its actor was built with as a caption (to see what the job hands a stage)."""

    def __init__(self, config):
        dump = config.model_dump(mode="json")
        if "read" in type(config).model_fields:  # the job's read policy (excluded from the stage's own dump)
            dump["read"] = config.read.model_dump(mode="json")
        self.dump = json.dumps(dump)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        for r in records:
            r.captions.append(Caption(self.dump, "probe"))
        return with_records(batch, records)


class KillProbe:
    """Kills its own process (as a segfault or CUDA OOM would) whenever it is handed a key ending in ``_3``."""

    def __init__(self, config):
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(str(k).endswith("_3") for k in batch["key"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return batch


class HangProbe:
    """Never returns from a batch holding a key ending in ``_3`` (a hung kernel or a deadlock)."""

    def __init__(self, config):
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(str(k).endswith("_3") for k in batch["key"]):
            while True:
                time.sleep(1)
        return batch
