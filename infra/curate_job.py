r"""Entry point of a curation job on a Ray cluster; the arguments are those of ``python -m pipeline curate``.

    ray submit infra/ray/cluster-gpu.yaml infra/curate_job.py -- --config pipeline/configs/coco.yaml \
        --images /data/coco/train2017 --annotations /data/coco/annotations/instances_train2017.json \
        --output /data/shards/coco
    ray job submit --address http://HEAD:8265 --working-dir . -- python infra/curate_job.py \
        --config pipeline/configs/coco.yaml --images ... --output ...

On the head node ``RAY_ADDRESS`` is set by ``ray submit``/``ray job submit`` (or ``auto`` here when
it is not), so the job joins the running cluster instead of starting a local Ray. Paths are seen by
every node: put data and output on a shared file system (NFS, FSx, GCS-Fuse...).

``ray submit`` copies this one file to the head node's home directory and runs it there, away from
the repository; the repository is then found through ``$USE_REPO`` (``infra/ray/cluster-gpu.yaml``
sets it, and puts the repository's ``.venv`` first on ``PATH`` so that ``python`` is the project's).
The job runs from the repository root, so relative paths such as ``pipeline/configs/coco.yaml``
mean the same under ``ray submit``, ``ray job submit --working-dir .`` and a local run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def find_repo() -> Path:
    """The repository root: this file's parent's parent, else ``$USE_REPO`` (a ``ray submit`` copy)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here, Path(os.environ.get("USE_REPO", "")).expanduser()):
        if str(candidate) and (candidate / "pipeline" / "cli.py").is_file():
            return candidate
    raise SystemExit(f"cannot find the USE repository next to {__file__}; set USE_REPO to its path")


if __name__ == "__main__":
    repo = find_repo()
    sys.path.insert(0, str(repo))  # the repository, when not pip-installed
    os.chdir(repo)
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from pipeline.cli import main

    raise SystemExit(main(["curate", *sys.argv[1:]]))
