"""Job configs: every shipped YAML loads, dotted overrides compose, mistakes name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, apply_override, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "pipeline" / "configs").glob("*.yaml"))


def test_every_shipped_config_loads():
    names = {p.stem: load_config(p) for p in CONFIGS}
    assert {"coco", "vg", "folder", "coco-annotations", "demo"} <= set(names)
    assert names["coco-annotations"].enabled_stages() == [] and names["demo"].enabled_stages() == []
    for full in ("coco", "vg", "folder"):
        assert names[full].enabled_stages() == ["captioner", "phrases", "grounder", "segmenter"]
        assert all(getattr(names[full], s).num_cpus <= 1 for s in names[full].enabled_stages())
    assert names["vg"].source.kind == "vg" and names["demo"].source.dataset == "synth"


def test_dotted_overrides_parse_yaml_values_and_compose():
    cfg = load_config("pipeline/configs/coco.yaml", [
        "shards.max_samples=100", "grounder.box_threshold=0.3", "captioner.enabled=false",
        "source.kind=folder", "source.extensions=[.png]", "captioner.prompts={scene: Describe it.}", "captioner.max_new_tokens={scene: 64}",
        "ray.address="])
    assert cfg.shards.max_samples == 100 and cfg.grounder.box_threshold == 0.3
    assert cfg.enabled_stages() == ["phrases", "grounder", "segmenter"]
    assert cfg.source.extensions == [".png"] and cfg.captioner.prompts == {"scene": "Describe it."}
    d: dict = {}
    apply_override(d, "a.b.c=1")
    assert d == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override, words", [
    ("shards.max_samples=0", "shards.max_samples"),
    ("grounder.box_thresh=0.3", "grounder.box_thresh"),
    ("nms.iou_threshold=2", "nms.iou_threshold"),
    ("impl.painter=x:Y", "unknown stages"),
    ("no_equals_sign", "key.path=value"),
    ("shards.prefix.x=1", "not a section"),
])
def test_mistakes_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config("pipeline/configs/demo.yaml", [override])


def test_a_stage_section_in_yaml_is_on_unless_it_says_otherwise(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("segmenter:\n  model: some/sam\ngrounder:\n  enabled: false\n")
    assert load_config(p).enabled_stages() == ["segmenter"]
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_ray_submit_entry_script_runs_from_a_copy(tmp_path):
    """``ray submit`` runs a copy of infra/curate_job.py from the head node's home directory: it must
    find the repository through $USE_REPO and resolve relative config paths from the repository."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "curate_job.py"
    shutil.copy(root / "infra" / "curate_job.py", copy)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "USE_REPO")}
    lost = subprocess.run([sys.executable, str(copy), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert lost.returncode != 0 and "USE_REPO" in lost.stderr
    found = subprocess.run([sys.executable, str(copy), "--config", "pipeline/configs/demo.yaml", "--output",
                            str(tmp_path / "out"), "no-such-key=1"], cwd=tmp_path,
                           env={**env, "USE_REPO": str(root)}, capture_output=True, text=True, timeout=120)
    # the relative config path resolved from the repository: the error is about the override, not the file
    assert found.returncode == 2 and "no-such-key" in found.stderr and "not found" not in found.stderr, found.stderr


@pytest.mark.parametrize("source, words", [
    ({"kind": "coco", "regions": "r.json"}, "source.regions (read by vg sources only)"),
    ({"kind": "vg", "captions": "c.json"}, "source.captions (read by coco sources only)"),
    ({"kind": "folder", "annotations": "a.json"}, "source.annotations (read by coco/vg sources only)"),
    ({"kind": "coco", "extensions": [".png"]}, "source.extensions (read by folder sources only)"),
    ({"kind": "vg", "keep_crowd": True}, "source.keep_crowd"),
])
def test_a_field_of_another_source_kind_is_an_error(source, words):
    """Each source kind takes only its own fields: ``--regions`` on a COCO job is refused, not ignored."""
    from pipeline.config import JobConfig

    with pytest.raises(Exception, match=re.escape(words)):
        JobConfig.model_validate({"source": source})


def test_fields_of_the_right_kind_are_accepted():
    from pipeline.config import JobConfig

    JobConfig.model_validate({"source": {"kind": "vg", "annotations": "a.json", "regions": "r.json"}})
    JobConfig.model_validate({"source": {"kind": "folder", "extensions": [".png"]}})
    JobConfig.model_validate({"source": {"kind": "coco", "captions": "c.json", "keep_crowd": True}})
