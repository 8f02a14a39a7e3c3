"""The GPU suite runs end to end on tiny architectures on the CPU, records failures and budgets, and its
report (sizing, Markdown section) is what the figures say. Also ``benchmarks.run``'s JSON contract."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import run as bench_run
from benchmarks.common import Entry, Section
from benchmarks.gpu.config import CONFIGS, GpuBenchConfig, GroundingBench
from benchmarks.gpu.models import phrase_prompts
from benchmarks.gpu.report import BEGIN, END, allocate, render, splice

ROOT = Path(__file__).resolve().parents[1]


def _suite(args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_tiny_suite_measures_every_model_and_sizes_the_stages(tmp_path):
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nabove\n")
    proc = _suite(["--tiny", "--out", str(tmp_path / "gpu"), "--markdown", str(md)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    errors = [r for r in res["records"] if r.get("error") or r.get("skipped")]
    assert not errors, errors
    assert res["matmul_peak"]["flops_per_s"] > 0
    measured = [r for r in res["records"] if r.get("median_s") and "images" in r]
    for model in ("sam", "gdino_t", "gdino_b", "llava", "use"):
        mine = [r for r in measured if r["model"] == model and not r["compiled"]]
        assert mine, f"no eager measurement of {model}"
        for r in mine:
            assert r["images_per_s"] > 0 and r["flops"] > 0 and 0 < r["mfu"], r
    whats = {(r["model"], r["what"]) for r in measured}
    assert {("sam", "box decoder + RLE"), ("sam", "automatic masks"), ("use", "train step (feature cache)"),
            ("use", "train step (images)")} <= whats
    assert any(r["compiled"] for r in measured), "no torch.compile measurement ran"
    stages = {s["stage"]: s for s in res["stages"]}
    assert {"caption", "ground", "segment", "cache features", "train (feature cache)"} <= set(stages)
    for s in stages.values():
        assert math.isclose(s["gpu_hours_per_10k"], 10_000 / s["images_per_s"] / 3600)
    assert [a["gpus"] for a in res["allocation"]] == [8, 100]
    for a in res["allocation"]:
        assert sum(a["per_stage"].values()) == a["gpus"]
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nabove\n") and BEGIN in text and END in text
    assert "### Sizing" in text and "| caption |" in text
    # re-rendering the saved JSON replaces the section instead of adding another
    again = _suite(["--render", str(tmp_path / "gpu" / "gpu.json"), "--markdown", str(md)])
    assert again.returncode == 0, again.stderr
    assert md.read_text().count(BEGIN) == 1


@pytest.mark.slow
def test_failures_and_budgets_are_recorded_and_the_rest_goes_on(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg.update(kill_grace_s=0, min_start_s=1)
    cfg["sam"] = {**cfg["sam"], "budget_s": 1}  # cannot even import torch in 1 s: killed
    cfg["llava"] = {**cfg["llava"], "compile": False, "arch": {"image_seq_length": 5}}  # wrong image-token count
    for m in ("gdino_t", "gdino_b", "use"):
        cfg[m] = {**cfg[m], "enabled": False}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _suite(["--config", str(path), "--out", str(tmp_path / "gpu")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    by_model = {}
    for r in res["records"]:
        by_model.setdefault(r["model"], []).append(r)
    assert any("killed" in (r.get("error") or "") for r in by_model["sam"])
    llava_errors = [r for r in by_model["llava"] if r.get("error")]
    assert llava_errors and all(r["what"] == "generate" for r in llava_errors)
    assert res["matmul_peak"]["flops_per_s"] > 0  # the peak still ran
    assert "Errors and skips" in (tmp_path / "gpu" / "gpu.md").read_text()


def test_spent_suite_budget_skips_the_remaining_models(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg.update(total_budget_s=5, min_start_s=30)  # nothing may start, not even the matmul peak
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _suite(["--config", str(path), "--out", str(tmp_path / "gpu")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    skipped = {r["model"] for r in res["records"] if "suite budget spent" in (r.get("skipped") or "")}
    assert skipped == {"matmul", "sam", "gdino_t", "gdino_b", "llava", "use"}
    assert "No GPU split" in (tmp_path / "gpu" / "gpu.md").read_text()


def test_full_config_fits_the_eight_minute_budget():
    cfg = GpuBenchConfig.from_yaml(CONFIGS / "full.yaml")
    assert cfg.size == "full" and cfg.dtype == "bf16"
    # a child's budget is cut to what is left of the total, and it may run kill_grace_s past it
    assert cfg.total_budget_s + cfg.kill_grace_s + 15 < 8 * 60
    assert set(cfg.models()) == {"sam", "gdino_t", "gdino_b", "llava", "use"}


def test_allocation_follows_gpu_time_per_image():
    stages = [{"stage": "caption", "images_per_s": 1.0}, {"stage": "ground", "images_per_s": 4.0},
              {"stage": "segment", "images_per_s": 4.0}]
    a = allocate(stages, 12)
    assert a["per_stage"] == {"caption": 8, "ground": 2, "segment": 2}
    assert a["images_per_s"] == 8.0
    assert allocate(stages, 2) is None  # fewer GPUs than stages


def test_phrase_prompts_fit_the_text_limit():
    mc = GroundingBench()
    for limit in (32, 256):
        prompts = phrase_prompts(mc, limit, 30522)
        assert all(len(p) <= limit and p[0] == 101 and p[-1] == 102 for p in prompts)
        assert sum(p.count(1012) for p in prompts) == len(mc.phrases)


def test_splice_replaces_only_the_gpu_section(tmp_path):
    md = tmp_path / "B.md"
    md.write_text(f"head\n\n{BEGIN}\nold\n{END}\n\ntail\n")
    splice(md, f"{BEGIN}\nnew\n{END}\n")
    assert md.read_text() == f"head\n\n{BEGIN}\nnew\n{END}\n\ntail\n"


def test_render_names_the_device_and_lists_errors():
    res = {"size": "full", "date": "d", "elapsed_s": 60, "command": "python -m benchmarks.gpu --out x",
           "device": {"device": "NVIDIA H200", "device_type": "cuda"}, "matmul_peak": {"flops_per_s": 7e14, "n": 8192},
           "config": {"dtype": "bf16"}, "stages": [], "allocation": [],
           "records": [{"model": "llava", "what": "generate", "batch": 8, "compiled": True, "error": "OOM"}]}
    text = render(res)
    assert "NVIDIA H200" in text and "700 TFLOP/s" in text and "`llava` generate batch 8 compiled: error: OOM" in text


def test_bench_run_writes_json_entries_and_markdown(tmp_path, monkeypatch):
    sections = {"bench_a": Section("## A\n\ntext", [Entry.cost("a-1", 2.0, 0.5, "s", 3.0, "n"),
                                                    Entry.rate("a-2", 10.0, 5.0, "items/s", 0.5, "m")]),
                "bench_b": "## B\n\nplain markdown"}

    def fake(name):
        if name == "bench_c":
            raise RuntimeError("broken module")
        return sections[name] if isinstance(sections[name], Section) else Section(sections[name])

    monkeypatch.setattr(bench_run, "module_names", lambda: ["bench_a", "bench_b", "bench_c"])
    monkeypatch.setattr(bench_run, "run_module", fake)
    out, js = tmp_path / "B.md", tmp_path / "o" / "bench.json"
    assert bench_run.main(["--out", str(out), "--json", str(js)]) == 1  # one module failed
    entries = json.loads(js.read_text())
    assert [e["name"] for e in entries] == ["a-1", "a-2"]
    assert set(entries[0]) == {"name", "baseline", "ours", "unit", "ratio", "target", "note"}
    assert entries[0]["ratio"] == 4.0 and entries[1]["ratio"] == 0.5
    text = out.read_text()
    assert "## Summary" in text and "`a-1`" in text and "## B" in text and "broken module" in text
    assert "GPU suite" in text
    assert (js.parent / "machine.json").is_file()
