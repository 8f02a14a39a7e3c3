"""From the GPU suite's records to figures, a sizing table and the Markdown section.

Derived per measurement: images/s, items/s, achieved TFLOP/s (counted FLOPs over the median time)
and MFU (that over the bf16 matmul rate measured first in the same run). Per pipeline stage, the
best measurement (any batch size, eager or compiled) gives images/s per GPU, hence GPU-hours per 10k
images, and the curation stages' GPUs are split in proportion to their GPU time per image, so that
no stage starves the next (the job's rate is the smallest ``GPUs x images/s`` of the stages).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"

#: (stage, model, measurement, label); "segment" adds the box decoder to the image encoder.
STAGES = [
    ("caption", "llava", "generate", "LLaVA-1.5-7B captions"),
    ("ground", "gdino_b", "forward", "Grounding DINO Swin-B"),
    ("ground (Swin-T)", "gdino_t", "forward", "Grounding DINO Swin-T"),
    ("segment", "sam", "image encoder", "SAM ViT-H encoder + box decoder"),
    ("cache features", "use", "features", "CLIP ViT-L/14-336 + DINOv2-L"),
    ("train (feature cache)", "use", "train step (feature cache)", "USE step from the cache"),
    ("train (images)", "use", "train step (images)", "USE step from images"),
    ("evaluation masks", "sam", "automatic masks", "SAM ViT-H automatic masks"),
]
CURATION = ("caption", "ground", "segment")
FLEETS = (8, 100)


def _derive(r: dict[str, Any], peak: float | None) -> dict[str, Any]:
    out = dict(r)
    t = r.get("median_s")
    if t and "images" in r:
        out["images_per_s"] = r["images"] / t
        out["items_per_s"] = r["items"] / t
        if r.get("flops"):
            out["tflops"] = r["flops"] / t / 1e12
            out["mfu"] = r["flops"] / t / peak if peak else None
    return out


def _best(records: list[dict[str, Any]], model: str, what: str) -> dict[str, Any] | None:
    got = [r for r in records if r["model"] == model and r.get("what") == what and r.get("images_per_s")]
    return max(got, key=lambda r: r["images_per_s"]) if got else None


def stage_rates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stages = []
    for stage, model, what, label in STAGES:
        best = _best(records, model, what)
        if best is None:
            continue
        rate = best["images_per_s"]
        how = f"batch {best['batch']}, {'compiled' if best['compiled'] else 'eager'}"
        if stage == "segment":
            dec = _best(records, "sam", "box decoder + RLE")
            if dec is None:
                continue
            rate = 1.0 / (1.0 / rate + dec["median_s"])
            how += f"; + {dec['items']:.0f} boxes decoded ({dec['median_s'] * 1000:.0f} ms)"
        stages.append({"stage": stage, "label": label, "images_per_s": rate, "how": how,
                       "gpu_hours_per_10k": 10_000 / rate / 3600})
    return stages


def allocate(stages: list[dict[str, Any]], gpus: int) -> dict[str, Any] | None:
    """GPUs per curation stage in proportion to GPU time per image (largest remainder, at least 1 each)."""
    cur = {s["stage"]: s for s in stages if s["stage"] in CURATION}
    if len(cur) < len(CURATION) or gpus < len(cur):
        return None
    cost = {k: 1.0 / s["images_per_s"] for k, s in cur.items()}
    total = sum(cost.values())
    share = {k: gpus * c / total for k, c in cost.items()}
    alloc = {k: max(1, math.floor(v)) for k, v in share.items()}
    while sum(alloc.values()) < gpus:
        k = max(share, key=lambda k: share[k] - alloc[k])
        alloc[k] += 1
    while sum(alloc.values()) > gpus:
        k = max((k for k in alloc if alloc[k] > 1), key=lambda k: alloc[k] - share[k])
        alloc[k] -= 1
    rate = min(alloc[k] * cur[k]["images_per_s"] for k in alloc)
    return {"gpus": gpus, "per_stage": alloc, "images_per_s": rate, "bottleneck": min(
        alloc, key=lambda k: alloc[k] * cur[k]["images_per_s"])}


def build_results(cfg: Any, records: list[dict[str, Any]], *, elapsed_s: float, command: str) -> dict[str, Any]:
    device = next((r for r in records if r.get("what") == "device"), {})
    peak_rec = next((r for r in records if r.get("what") == "matmul peak"), None)
    peak = peak_rec["flops_per_s"] if peak_rec else None
    derived = [_derive(r, peak) for r in records]
    stages = stage_rates(derived)
    return {"suite": "benchmarks.gpu", "date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
            "size": cfg.size, "elapsed_s": elapsed_s, "device": device, "matmul_peak": peak_rec,
            "config": cfg.model_dump(mode="json"), "records": derived, "stages": stages,
            "allocation": [a for a in (allocate(stages, n) for n in FLEETS) if a]}


def _f(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def render(results: dict[str, Any]) -> str:
    dev = results.get("device") or {}
    peak = results.get("matmul_peak") or {}
    tiny = results.get("size") == "tiny"
    lines = [BEGIN, "## GPU suite (`python -m benchmarks.gpu`)", ""]
    if tiny:
        lines += ["**Tiny architectures on the CPU (the test suite's smoke run): the figures below say nothing about "
                  "real models.**", ""]
    lines += [
        f"Device: **{dev.get('device', 'unknown')}** ({dev.get('device_type', '?')}; torch {dev.get('torch', '?')}, "
        f"transformers {dev.get('transformers', '?')}, CUDA {dev.get('cuda')}), {results['date']}, "
        f"{results['elapsed_s'] / 60:.1f} minutes. Command: `{results['command']}`. Random weights, "
        f"{'tiny' if tiny else 'the real'} architectures (`benchmarks/gpu/arch.py`), {results['config']['dtype']}.",
        "",
        f"Measured {peak.get('dtype', '?')} matmul peak ({peak.get('n', '?')}^3): "
        f"**{_f((peak.get('flops_per_s') or math.nan) / 1e12)} TFLOP/s**; MFU = counted model FLOPs per second over it "
        "(`torch.utils.flop_counter`; Grounding DINO's deformable-attention sampling is not counted).",
        "",
        "| model | measurement | batch | compile | images/s | items/s | median (s) | TFLOP/s | MFU | peak mem (GB) | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    problems = []
    for r in results["records"]:
        if r.get("what") in ("device", "matmul peak"):
            continue
        if r.get("error") or r.get("skipped"):
            problems.append(f"- `{r['model']}` {r.get('what', '')} batch {r.get('batch', '-')}"
                            f"{' compiled' if r.get('compiled') else ''}: "
                            f"{'error' if r.get('error') else 'skipped'}: {r.get('error') or r.get('skipped')}")
            continue
        lines.append(f"| {r['model']} | {r['what']} | {r['batch']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{_f(r.get('images_per_s'))} | {_f(r.get('items_per_s'))} {r['item']} | {_f(r['median_s'])} | "
                     f"{_f(r.get('tflops'))} | {_f(r.get('mfu'), '.1%')} | {_f(r.get('peak_mem_gb'), '.1f')} | "
                     f"{r.get('note', '')} |")
    if problems:
        lines += ["", "Errors and skips (each recorded, the rest went on):", "", *problems]
    lines += ["", "### Sizing", "",
              "Best measurement per stage (any batch size, eager or compiled), one GPU:", "",
              "| stage | model | images/s per GPU | GPU-hours per 10k images | best run |", "|---|---|---:|---:|---|"]
    for s in results["stages"]:
        lines.append(f"| {s['stage']} | {s['label']} | {_f(s['images_per_s'])} | {_f(s['gpu_hours_per_10k'])} | "
                     f"{s['how']} |")
    if results.get("allocation"):
        lines += ["", "GPUs per curation stage so that no stage starves the next (GPU time per image split "
                      "proportionally; phrases stage on CPUs):", "",
                  "| GPUs | " + " | ".join(CURATION) + " | job images/s | bottleneck |",
                  "|---:|" + "---:|" * len(CURATION) + "---:|---|"]
        for a in results["allocation"]:
            lines.append(f"| {a['gpus']} | " + " | ".join(str(a["per_stage"][k]) for k in CURATION) +
                         f" | {_f(a['images_per_s'])} | {a['bottleneck']} |")
    else:
        lines += ["", "No GPU split: not every curation stage (caption, ground, segment) has a figure."]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def splice(path: Path, section: str) -> None:
    """Replace the GPU section of a Markdown file (between the markers), or append it."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section.strip() + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + section
    path.write_text(text if text.endswith("\n") else text + "\n")
