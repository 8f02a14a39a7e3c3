"""Every command of README.md, run as written in a fresh clone after `make setup`, exits 0.

Commands are read from the README itself, so one added later is picked up without touching this file:
every line of a ```bash block (continuation lines joined, comments stripped), every inline code span
that starts with a command (`make ...`, `python -m ...`, `VAR=x infra/script.sh ...`), and the
```python blocks (run as a script). Each one runs in a `git clone` of this repository's HEAD whose
`.venv` is a symlink to this checkout's, so that the clone's `make setup` finds its stamp up to date and
does nothing; `PATH` starts with the clone's `.venv/bin` and `PYTHONPATH` is the clone (what
`source .venv/bin/activate` and the clone's own editable install would give).

What may differ from the README's text, all in the tables below and each checked by a test:
- PLACEHOLDERS: absolute paths of the user's data and weights, replaced by the shared sample data
  (``../shared/data``) and a temporary folder. Relative ones (``datasets/ADEChallengeData2016``,
  ``sam_vit_h_4b8939.pth``) are created in the clone before the commands run, so those commands
  are not changed at all.
- RUN_AS: a command that cannot run as written here (a synopsis, a bare program name, a server, a
  cluster) runs in the form given, with its reason, and its output must show the expected text.
- EXCLUDED: not run, with a reason whose check must still hold.
A README command with a placeholder-looking word (``...``, ``DIR``, ``N``, ``<x>``, ``{a,b}``) in
none of the tables fails `test_every_readme_command_is_run_or_excluded`, as does a table entry the
README no longer has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_segment_anything

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# The first word of an inline code span that makes it a command (after optional VAR=value words).
COMMAND_WORDS = r"(?:make|python3?|\.venv/bin/\S+|ray|torchrun|pip|pip-audit|tensorboard|srun|jupyter|" \
                r"use-pipeline|use-shards|use-trainer|infra/\S+\.sh)"
# Words that mark a command as a template rather than something to type as it is.
PLACEHOLDER_RE = re.compile(r"\.\.\.|…|<[^>]+>|\{[^}]*,[^}]*\}|\[[^\]]*\]|(?<![\w/.-])(?:DIR|N|CKPT|ROOT|OUTPUT|host)(?![\w/.=-])")


@dataclass(frozen=True)
class Command:
    text: str      # as the README has it (whitespace collapsed)
    kind: str      # "bash", "inline" or "python"


def readme_commands(text: str) -> list[Command]:
    """The README's commands in reading order."""
    found: list[tuple[int, Command]] = []
    for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) == "python":
            found.append((m.start(), Command(m.group(2), "python")))
            continue
        body = re.sub(r"\\\n\s*", " ", m.group(2))
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                found.append((m.start(), Command(" ".join(line.split()), "bash")))
    prose = re.sub(r"^```.*?^```", lambda m: " " * len(m.group(0)), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if re.match(rf"^(?:[A-Z_]+=\S+\s+)*{COMMAND_WORDS}(?:\s|$)", span):
            found.append((m.start(), Command(span, "inline")))
    seen: set[str] = set()
    out = []
    for _, cmd in sorted(found, key=lambda x: x[0]):
        if cmd.text not in seen:
            seen.add(cmd.text)
            out.append(cmd)
    return out


# --- the tables -------------------------------------------------------------------------------------

#: README path prefix -> what stands for it here ({shared}: ../shared/data, {tmp}: the test's folder).
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "/data/coco/": ("{shared}/coco2017_val_subset/",
                    "COCO 2017 val: the 40-image subset, same val2017/ and annotations/*_val2017.json layout"),
    "/models/": ("{tmp}/models/", "where `models download --cache /models` puts weights; here tiny random ones"),
}

#: Relative README paths the test creates in the clone (the commands naming them run unchanged).
#: datasets/ADEChallengeData2016: a copy of {shared}/ade20k_sceneparsing_val (the SceneParsing
#: layout; copied because `prepare` writes into --src). sam_vit_h_4b8939.pth: a tiny segment-anything
#: checkpoint in the official layout (tests/tiny_models.py). $USE_MODELS_DIR={tmp}/models, where
#: facebook/sam-vit-huge (evaluation's default SAM) is the README's converted {tmp}/models/sam-vit-h.


@dataclass(frozen=True)
class RunAs:
    command: str
    reason: str
    expect: tuple[str, ...] = ()   # texts its output must contain


RUN_AS: dict[str, RunAs] = {
    "python -m pipeline config show coco [key=value ...]": RunAs(
        "python -m pipeline config show coco grounder.box_threshold=0.3", "[key=value ...] is optional: one example key",
        ("box_threshold: 0.3",)),
    "use-pipeline": RunAs("use-pipeline --version", "a program name; the README says --version prints the version"),
    "use-shards": RunAs("use-shards --version", "a program name; the README says --version prints the version"),
    "python -m evaluation semseg --dataset {ade20k-150,ade20k-847,pc-59,pc-459,voc-20,synth} --root ROOT "
    "--checkpoint CKPT --output DIR [--oracle] [--save-predictions] [--limit N] [key=value ...]": RunAs(
        "python -m evaluation semseg --help", "a synopsis (run for real by `make eval-ade20k` / `make eval`): "
        "--help must list its options and datasets",
        ("--root", "--checkpoint", "--output", "--oracle", "--save-predictions", "--limit",
         "ade20k-150", "ade20k-847", "pc-59", "pc-459", "voc-20", "synth")),
    "python -m evaluation prepare {ade20k-150,ade20k-847,pc-59,pc-459,voc-20} --src <official download>": RunAs(
        "python -m evaluation prepare --help", "a synopsis (run for real on ADE20K): --help must list it",
        ("--src", "ade20k-150", "ade20k-847", "pc-59", "pc-459", "voc-20")),
    "NNODES=N HEAD=host infra/train_multinode.sh --config ... --shards ... --output ...": RunAs(
        "NNODES=1 HEAD=127.0.0.1 infra/train_multinode.sh --config trainer/configs/demo.yaml "
        "--shards outputs/demo/shards --output outputs/train --resume steps=20",
        "placeholders: one node here, resuming the run of `make train` (done at step 20)",
        ("final model in outputs/train/final",)),
    "tensorboard --logdir OUTPUT/tensorboard": RunAs(
        "tensorboard --inspect --logdir outputs/train/tensorboard",
        "a server that runs until stopped; --inspect reads the same logs and exits", ("loss",)),
    "ray submit infra/ray/cluster-gpu.yaml infra/curate_job.py -- --config pipeline/configs/coco.yaml "
    "--images /data/coco/train2017 --annotations /data/coco/annotations/instances_train2017.json "
    "--output /data/use/coco": RunAs(
        "python infra/curate_job.py --help", "needs a Ray cluster; its entry script runs here",
        ("--config", "--images", "--annotations", "--output")),
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python infra/curate_job.py "
    "--config ... --output ...": RunAs(
        "python infra/curate_job.py --help", "needs a Ray cluster's job server; its entry script runs here",
        ("--config", "--output")),
}


def _makefile_recipe(target: str) -> str:
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n|\n)*)", (REPO / "Makefile").read_text(), re.M)
    return m.group(1) if m else ""


def _hf_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _runs(args: list[str], expect: str) -> bool:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and expect in " ".join(done.stdout.split())


@dataclass(frozen=True)
class Excluded:
    reason: str
    still_valid: Callable[[], bool]


VITL14 = (REPO / "trainer" / "configs" / "model-vitl14.yaml")
EXCLUDED: dict[str, Excluded] = {
    "make test": Excluded("the whole suite, which holds this test (CI runs it)",
                          lambda: "pytest" in _makefile_recipe("test")),
    "make bench": Excluded("10 minutes of benchmarks; the lead runs `make bench` itself",
                           lambda: "benchmarks.run" in _makefile_recipe("bench")),
    "make bench-gpu": Excluded("needs a GPU; its code runs at tiny size in tests/test_bench_gpu_tiny.py",
                               lambda: "benchmarks.gpu" in _makefile_recipe("bench-gpu")
                               and (REPO / "tests" / "test_bench_gpu_tiny.py").is_file()),
    "python -m benchmarks.gpu --out DIR": Excluded(
        "what `make bench-gpu` runs (needs a GPU)", lambda: "-m benchmarks.gpu --out" in _makefile_recipe("bench-gpu")),
    "ray up infra/ray/cluster-gpu.yaml": Excluded(
        "starts cloud machines; tests/test_job_cluster_configs.py validates the config with Ray's schema",
        lambda: (REPO / "infra/ray/cluster-gpu.yaml").is_file()
        and (REPO / "tests/test_job_cluster_configs.py").is_file()),
    "srun infra/train_multinode.sh ...": Excluded("needs SLURM (the script itself runs above)",
                                                  lambda: shutil.which("srun") is None),
    "python -m pipeline models download --config pipeline/configs/coco.yaml --cache /models": Excluded(
        "downloads weights (network)", lambda: _runs(["-m", "pipeline", "models", "--help"], "needs internet")),
    "pip-audit -r constraints.txt": Excluded(
        "needs the vulnerability database online (not part of `make lint`)",
        lambda: "pip-audit" not in _makefile_recipe("lint")),
    "python -m trainer train --config trainer/configs/vitl14.yaml --shards /data/use/coco --output outputs/train "
    "--resume": Excluded("needs the CLIP ViT-L/14-336 and DINOv2-L weights (network) and GPUs",
                         lambda: "facebook/dinov2-large" in VITL14.read_text() and not _hf_cached("facebook/dinov2-large")),
    "python -m trainer cache-features --config trainer/configs/vitl14.yaml --shards /data/use/coco": Excluded(
        "needs the CLIP ViT-L/14-336 and DINOv2-L weights (network) and GPUs",
        lambda: "facebook/dinov2-large" in VITL14.read_text() and not _hf_cached("facebook/dinov2-large")),
    "python -m pipeline synth": Excluded("a step of `make demo`, which runs",
                                         lambda: "-m pipeline synth" in _makefile_recipe("demo")),
    "python -m evaluation tiny-sam": Excluded("a step of `make demo`, which runs",
                                              lambda: "-m evaluation tiny-sam" in _makefile_recipe("demo")),
    "python -m evaluation index/query": Excluded(
        "shorthand for the index and query commands of the README, which run",
        lambda: all(any(c.text.startswith(f"python -m evaluation {s} ") for c in COMMANDS) for s in ("index", "query"))),
}

COMMANDS = readme_commands(README.read_text())


def _covered_by_another(cmd: Command) -> bool:
    """An inline mention whose words start a block command (`make demo` in `make setup && make demo`)."""
    if cmd.kind != "inline":
        return False
    parts = [p.strip() for c in COMMANDS if c.kind == "bash" for p in c.text.split("&&")]
    return any(p == cmd.text or p.startswith(cmd.text + " ") for p in parts)


def _to_run(cmd: Command) -> tuple[str, tuple[str, ...]] | None:
    """The shell command run for ``cmd`` and the texts its output must contain; None if not run."""
    if cmd.text in EXCLUDED or _covered_by_another(cmd):
        return None
    if cmd.text in RUN_AS:
        return RUN_AS[cmd.text].command, RUN_AS[cmd.text].expect
    return cmd.text, ()


def test_every_readme_command_is_run_or_excluded():
    """New README commands are run automatically; a template-looking one must be in a table, and every
    table entry must still be in the README, with its exclusion reason still true."""
    texts = {c.text for c in COMMANDS}
    assert len(COMMANDS) >= 30, f"only {len(COMMANDS)} commands found: is the README's format still ```bash?"
    for cmd in COMMANDS:
        run = _to_run(cmd)
        if run is None or cmd.kind == "python":
            continue
        left = run[0]
        for prefix in PLACEHOLDERS:
            left = left.replace(prefix, "/")
        assert not PLACEHOLDER_RE.search(left), (
            f"README command {cmd.text!r} looks like a template ({PLACEHOLDER_RE.search(left).group(0)!r}): "
            "make it runnable as written, or add it to RUN_AS or EXCLUDED in tests/test_readme_commands.py")
    stale = [t for t in (*RUN_AS, *EXCLUDED) if t not in texts]
    assert not stale, f"tables name commands the README no longer has: {stale}"
    for text, ex in EXCLUDED.items():
        assert ex.still_valid(), f"exclusion of {text!r} no longer holds ({ex.reason}): run it instead"
    assert "make setup && make demo" in texts and any(c.kind == "python" for c in COMMANDS)


# --- the run ------------------------------------------------------------------------------------------

def _substitute(command: str, shared: Path, tmp: Path) -> str:
    for prefix, (target, _) in PLACEHOLDERS.items():
        command = command.replace(prefix, target.format(shared=shared, tmp=tmp))
    return command


def _fresh_clone(tmp: Path, shared: Path) -> tuple[Path, dict[str, str]]:
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    stamp = REPO / ".venv" / ".setup-stamp"
    assert stamp.exists(), "no .venv/.setup-stamp: run `make setup` in the checkout first"
    # git writes files with the time of the clone; the shared .venv stands for this clone's `make setup`,
    # so its inputs are dated just before the stamp (as they would be after the clone's own setup).
    old = stamp.stat().st_mtime - 1
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(clone / name, (old, old))
    dry = subprocess.run(["make", "-n", "setup"], cwd=clone, capture_output=True, text=True)
    assert "pip install" not in dry.stdout, "make setup would reinstall into the shared .venv:\n" + dry.stdout

    shutil.copytree(shared / "ade20k_sceneparsing_val", clone / "datasets" / "ADEChallengeData2016")
    torch.save(build_tiny_segment_anything(image_size=64).state_dict(), clone / "sam_vit_h_4b8939.pth")
    models = tmp / "models"
    (models / "facebook").mkdir(parents=True)
    (models / "facebook" / "sam-vit-huge").symlink_to(models / "sam-vit-h")  # written by the README's convert-sam

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "RAY_ADDRESS", "VIRTUAL_ENV"))}
    env.update(PATH=f"{clone / '.venv' / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(clone / ".venv"),
               PYTHONPATH=str(clone), USE_MODELS_DIR=str(models), HF_HUB_OFFLINE="1")
    return clone, env


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_commands_exit_0_in_a_fresh_clone(shared_data, tmp_path):
    clone, env = _fresh_clone(tmp_path, shared_data)
    timings: list[tuple[float, str]] = []
    for i, cmd in enumerate(COMMANDS):
        run = _to_run(cmd)
        if run is None or run[0] in {c for _, c in timings}:
            continue
        shell, expect = run
        if cmd.kind == "python":
            script = tmp_path / f"readme_snippet_{i}.py"
            script.write_text(cmd.text)
            shell = f"python {script}"
        shell = _substitute(shell, shared_data, tmp_path)
        start = time.monotonic()
        done = subprocess.run(["bash", "-c", shell], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=600)
        timings.append((time.monotonic() - start, shell))
        output = done.stdout + done.stderr
        assert done.returncode == 0, (f"README command exited {done.returncode}: {cmd.text}\nrun as: {shell}\n"
                                      f"output tail:\n{output[-3000:]}")
        for text in expect:
            assert text in output, f"{shell}: {text!r} not in its output\n{output[-3000:]}"
    print("\n".join(f"{s:7.1f} s  {c}" for s, c in timings))
    assert len(timings) >= 25
