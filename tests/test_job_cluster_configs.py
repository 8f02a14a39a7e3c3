"""The Ray cluster configs in infra/ray/ pass Ray's own config validation (the JSON schema Ray ships,
after Ray fills in its defaults) and expose no unauthenticated service on all interfaces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "infra" / "ray").glob("*.yaml"))


def _validated(config: dict) -> dict:
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    full = prepare_config(config)
    validate_config(full)  # jsonschema against ray/autoscaler/ray-schema.json
    return full


def test_there_is_a_cloud_and_an_on_premise_config():
    kinds = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CONFIGS}
    assert {"aws", "local"} <= kinds


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validation_and_listens_on_no_public_interface(path):
    config = _validated(yaml.safe_load(path.read_text()))
    commands = [c for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                              "head_setup_commands", "worker_setup_commands") for c in config.get(key, [])]
    for c in commands:
        assert "0.0.0.0" not in c and "::" not in c.replace("$RAY_HEAD_IP", ""), c
    head = " ".join(config["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head), head
    ingress = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in ingress:  # from anywhere: SSH only
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule


def test_rays_validation_rejects_a_broken_config():
    import jsonschema

    broken = yaml.safe_load(CONFIGS[0].read_text())
    broken["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="many"):
        _validated(broken)
