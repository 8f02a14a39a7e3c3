"""``python -m benchmarks.gpu``: run the GPU suite, one child process per model, under time budgets.

The parent never touches the GPU. It runs ``matmul`` (the bf16 peak) and then each enabled model in
a child process (``--child NAME``) with that model's budget, cut to what is left of the suite's total;
a child past its budget (plus ``kill_grace_s``) is killed with its process group, a child that dies
is recorded with the end of its log, and the next model starts either way. Children write one JSON
line per measurement as they go (see :mod:`benchmarks.gpu.measure`), so a killed child keeps what it
measured. At the end: ``OUT/gpu.json`` (records, derived figures, sizing, config), ``OUT/gpu.md``,
``OUT/records.jsonl``, ``OUT/children.log`` (the children's output) and, with
``--markdown FILE``, the GPU section of that file replaced. ``--render JSON --markdown FILE`` only
re-renders a saved result into the Markdown (how ``BENCHMARKS.md`` gets a GPU run's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .config import CONFIGS, GpuBenchConfig
from .report import build_results, render, splice

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu.json, gpu.md, records.jsonl and the children's logs")
    ap.add_argument("--tiny", action="store_true", help="tiny architectures on the CPU (configs/tiny.yaml)")
    ap.add_argument("--config", type=Path, help="suite config YAML (default: configs/full.yaml, or tiny.yaml)")
    ap.add_argument("--only", action="append", default=[], help="run only these models (sam, gdino_t, gdino_b, "
                                                                   "llava, use); the matmul peak always runs")
    ap.add_argument("--markdown", type=Path, help="also write the GPU section into this Markdown file")
    ap.add_argument("--render", type=Path, help="re-render a saved gpu.json into --markdown and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap


def load_config(args: argparse.Namespace) -> GpuBenchConfig:
    path = args.config or CONFIGS / ("tiny.yaml" if args.tiny else "full.yaml")
    return GpuBenchConfig.from_yaml(path)


def child(name: str, cfg: GpuBenchConfig, records: Path, deadline: float) -> int:
    """Run one model's benchmark in this process (the parent's ``--child``)."""
    import torch
    import transformers

    from .measure import DTYPES, Recorder
    from .models import RUNNERS

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    rec = Recorder(records, name, deadline, device)
    if name == "matmul":
        rec.write(what="device", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  device_type=device.type, torch=torch.__version__, transformers=transformers.__version__,
                  cuda=torch.version.cuda, threads=torch.get_num_threads())
    try:
        RUNNERS[name](cfg, rec, device, DTYPES[cfg.dtype])
    except Exception as e:  # the model could not be built or its inputs made: say so, exit non-zero
        rec.write(what="build", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-3000:])
        return 1
    return 0


def _run_child(name: str, args: argparse.Namespace, out: Path, records: Path, budget: float, grace: float) -> None:
    log = out / f"{name}.log"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", name, "--config", str(out / "config.yaml"),
           "--records", str(records), "--deadline", str(time.time() + budget)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget + grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _append(records, {"model": name, "what": "child", "error": f"killed after {time.time() - t0:.0f} s "
                                                                          f"(budget {budget:.0f} s + {grace:.0f} s)"})
            return
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        _append(records, {"model": name, "what": "child", "error": f"exit status {rc}: {' | '.join(tail)}"[:800]})
    print(f"[gpu] {name}: {time.time() - t0:.0f} s (exit {rc})", file=sys.stderr, flush=True)


def _gather_logs(out: Path, names: list[str]) -> None:
    """One ``children.log`` instead of a log per child, and no config copy (``gpu.json`` holds the config):
    OUT keeps four files (``gpu.json``, ``gpu.md``, ``records.jsonl``, ``children.log``), few enough to
    come back from a remote machine that returns a handful of files."""
    with (out / "children.log").open("w") as f:
        for name in names:
            log = out / f"{name}.log"
            if log.exists():
                f.write(f"===== {name} =====\n{log.read_text(errors='replace')}\n")
                log.unlink()
    (out / "config.yaml").unlink(missing_ok=True)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.render:
        if not args.markdown:
            ap.error("--render needs --markdown")
        splice(args.markdown, render(json.loads(args.render.read_text())))
        print(f"wrote the GPU section of {args.markdown}", file=sys.stderr)
        return 0
    cfg = load_config(args)
    if args.child:
        return child(args.child, cfg, args.records, args.deadline)
    if args.out is None:
        ap.error("--out is required")
    unknown = set(args.only) - set(cfg.models())
    if unknown:
        ap.error(f"--only: {sorted(unknown)} not among the enabled models {cfg.models()}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))  # JSON is YAML
    records = out / "records.jsonl"
    records.write_text("")
    start = time.time()
    end = start + cfg.total_budget_s
    names = ["matmul"] + [m for m in cfg.models() if not args.only or m in args.only]
    for name in names:
        budget = min(60.0 if name == "matmul" else getattr(cfg, name).budget_s, end - time.time())
        if budget < cfg.min_start_s:
            _append(records, {"model": name, "what": "child", "skipped": f"suite budget spent ({budget:.0f} s left)"})
            continue
        _run_child(name, args, out, records, budget, cfg.kill_grace_s)
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    results = build_results(cfg, recs, elapsed_s=time.time() - start,
                            command="python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    md = render(results)
    (out / "gpu.md").write_text(md)
    if args.markdown:
        splice(args.markdown, md)
    _gather_logs(out, names)
    errors = [r for r in recs if r.get("error")]
    print(f"[gpu] wrote {out / 'gpu.json'} in {time.time() - start:.0f} s; {len(errors)} errors", file=sys.stderr)
    return 0
