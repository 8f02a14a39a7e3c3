"""A run on a 3-node local Ray cluster (ray.cluster_utils.Cluster) gives the same metrics as the local run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from evaluation.config import CONFIG_DIR, EvalConfig
from evaluation.semseg import evaluate_semseg
from evaluation.tiny_sam import build_tiny_sam

SAM_PATH = ["sam.points_per_side=4", "overlays=0"]


@pytest.mark.slow
def test_three_node_cluster_equals_local_run(synth_dir, synth_model_dir, tmp_path):
    sam = build_tiny_sam(tmp_path / "sam")
    local_cfg = EvalConfig.from_yaml(CONFIG_DIR / "demo.yaml", [*SAM_PATH, f"sam.model={sam}", "ray.enabled=false"])
    local = evaluate_semseg(local_cfg, "synth", synth_dir, str(synth_model_dir), tmp_path / "local", limit=6,
                            progress=False)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        cfg = EvalConfig.from_yaml(CONFIG_DIR / "demo.yaml", [*SAM_PATH, f"sam.model={sam}", "ray.num_actors=3",
                                                              "ray.num_cpus=1"])
        spread = evaluate_semseg(cfg, "synth", synth_dir, str(synth_model_dir), tmp_path / "cluster", limit=6,
                                 progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()

    for key in ("mIoU", "mAcc", "pAcc", "fwIoU", "mIoU_mmseg", "images"):
        assert spread[key] == local[key], key
    assert spread["per_class_iou"] == local["per_class_iou"]
    per_image = list((tmp_path / "cluster/per_image").rglob("*.json"))
    nodes = {json.loads(p.read_text())["node"] for p in per_image}
    assert len(per_image) == 6 and len(nodes) >= 2  # spread over nodes (an actor that starts late may get none)
    local_cells = {p.name: json.loads(p.read_text())["cells"] for p in (tmp_path / "local/per_image").rglob("*.json")}
    for p in per_image:
        assert np.array_equal(json.loads(p.read_text())["cells"], local_cells[p.name])
