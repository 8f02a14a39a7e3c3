r"""Entry point of a curation job on a Ray cluster; the arguments are those of ``python -m pipeline curate``.

    ray submit infra/ray/cluster-gpu.yaml infra/curate_job.py -- --config pipeline/configs/coco.yaml \
        --images /data/coco/train2017 --annotations /data/coco/annotations/instances_train2017.json \
        --output /data/shards/coco
    ray job submit --address http://HEAD:8265 --working-dir . -- python infra/curate_job.py \
        --config pipeline/configs/coco.yaml --images ... --output ...

On the head node ``RAY_ADDRESS`` is set by ``ray submit``/``ray job submit`` (or ``auto`` here when
it is not), so the job joins the running cluster instead of starting a local Ray. Paths are seen by
every node: put data and output on a shared file system (NFS, FSx, GCS-Fuse...).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not pip-installed
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from pipeline.cli import main

    raise SystemExit(main(["curate", *sys.argv[1:]]))
