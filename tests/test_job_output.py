"""The output directory is a job's state: one job at a time (flock), another job's shards refused,
``--overwrite`` starts afresh, environment failures retried on rerun, a job with no sample fails,
a failed start writes nothing."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
import yaml
from job_helpers import write_coco

import shards
from pipeline import cli
from pipeline.config import load_config
from pipeline.job import CONFIG_SNAPSHOT, JobFailed, JobRefused, run_job
from shards import make_key


def _cfg(paths, *extra):
    return load_config("demo", ["source.name=out", f"source.images={paths['images']}",
                                f"source.annotations={paths['annotations']}", "ray.task_cpus=0.5", *extra])


@pytest.mark.slow
def test_environment_failures_are_retried_and_other_jobs_are_refused(tmp_path, ray_local):
    paths = write_coco(tmp_path / "data", {"a.png": (24, 20), "late.png": (24, 20), "bad.png": None},
                       captions=False, declared={"bad.png": (24, 20)})
    (paths["images"] / "bad.png").write_bytes(b"not an image")
    late = (paths["images"] / "late.png").read_bytes()
    (paths["images"] / "late.png").unlink()  # e.g. a mount not yet there: the environment's fault
    out = tmp_path / "out"
    first = run_job(_cfg(paths), out, progress=False, config_name="demo")
    assert (first["written"], first["failed"], first["retried"]) == (1, 2, 0)

    (paths["images"] / "late.png").write_bytes(late)
    second = run_job(_cfg(paths, "ray.task_retries=1"), out, progress=False)  # same data, other settings
    assert (second["already_done"], second["retried"], second["written"], second["failed"]) == (2, 1, 2, 1)
    assert shards.read_failures(out).to_pylist()[0]["key"] == make_key("out", 3)  # only bad.png is left
    snapshot = (out / CONFIG_SNAPSHOT).read_text()
    assert yaml.safe_load(snapshot)["ray"]["task_retries"] == 3  # the first run's config is kept

    (paths["images"] / "bad.png").write_bytes((paths["images"] / "a.png").read_bytes())
    third = run_job(_cfg(paths), out, progress=False, retry_failed=True)
    assert (third["retried"], third["written"], third["failed"]) == (1, 3, 0)
    assert max(shards_keys(out).values()) == 1

    other = tmp_path / "other.json"
    other.write_text(paths["annotations"].read_text())
    with pytest.raises(JobRefused) as e:
        run_job(_cfg({**paths, "annotations": other}, "nms.iou_threshold=0.5"), out, progress=False,
                config_name="demo")
    msg = str(e.value)
    assert str(out / CONFIG_SNAPSHOT) in msg and "(demo)" in msg and "--overwrite" in msg
    assert "source.annotations" in msg and "nms.iou_threshold: 0.8 there, 0.5 here" in msg and "\n" not in msg
    assert (out / CONFIG_SNAPSHOT).read_text() == snapshot  # a refused start writes nothing

    fresh = run_job(_cfg({**paths, "annotations": other}, "nms.iou_threshold=0.5"), out, progress=False,
                    overwrite=True)
    assert (fresh["already_done"], fresh["written"], fresh["shards"]) == (0, 3, 1)
    assert "0.5" in (out / CONFIG_SNAPSHOT).read_text()
    for p in out.iterdir():  # written with the umask's permissions, readable by the group (not 0600)
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o666 & ~_umask(), (p.name, oct(p.stat().st_mode))


def shards_keys(out):
    from job_helpers import shard_keys

    return shard_keys(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_job_into_a_locked_directory_is_refused_at_once(tmp_path, capsys):
    paths = write_coco(tmp_path / "data", {"a.png": (24, 20)}, captions=False)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        rc = cli.main(["curate", "--config", "demo", "--images", str(paths["images"]), "--annotations",
                       str(paths["annotations"]), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "in use by another curation job (pid 4242" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.slow
def test_a_job_whose_every_input_failed_exits_non_zero(tmp_path, ray_local, capsys):
    paths = write_coco(tmp_path / "data", {"a.png": None, "b.png": None}, captions=False,
                       declared={"a.png": (24, 20), "b.png": (24, 20)})
    for name in ("a.png", "b.png"):
        (paths["images"] / name).write_bytes(b"junk")
    rc = cli.main(["curate", "--config", "demo", "--images", str(paths["images"]), "--annotations",
                   str(paths["annotations"]), "--output", str(tmp_path / "out"), "--no-progress",
                   "ray.task_cpus=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: no input became a sample: all 2 failed (read 2)")
    with pytest.raises(JobFailed):
        run_job(_cfg(paths), tmp_path / "out2", progress=False)


def test_a_failed_start_writes_nothing(tmp_path, capsys):
    paths = write_coco(tmp_path / "data", {"a.png": (24, 20)}, captions=False)
    out = tmp_path / "out"
    base = ["curate", "--config", "demo", "--annotations", str(paths["annotations"]), "--output", str(out)]
    assert cli.main([*base, "--images", str(tmp_path / "no-such-dir")]) == 2
    assert "source.images (--images)" in capsys.readouterr().err and not out.exists()
    assert cli.main([*base, "--images", str(paths["images"]), "shards.prefix=../x"]) == 2
    assert "shards.prefix" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="prefix"):
        shards.ShardWriter(tmp_path / "w", prefix="../x")


def test_unknown_keys_say_where_they_came_from_and_the_closest_key(tmp_path, capsys):
    assert cli.main(["curate", "--config", "demo", "--output", str(tmp_path / "o"), "grounder.box_thresh=0.3"]) == 2
    err = capsys.readouterr().err
    assert "'grounder.box_thresh' on the command line" in err and "did you mean 'grounder.box_threshold'" in err
    bad = tmp_path / "job.yaml"
    bad.write_text("shards:\n  max_sample: 3\n")
    assert cli.main(["curate", "--config", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"'shards.max_sample' in {bad}" in err and "did you mean 'shards.max_samples'" in err


def test_missing_weights_are_listed_together_with_the_exact_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("USE_MODELS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    paths = write_coco(tmp_path / "data", {"a.png": (24, 20)})
    rc = cli.main(["curate", "--config", "coco", "--images", str(paths["images"]), "--annotations",
                   str(paths["annotations"]), "--output", str(tmp_path / "out"), "grounder.model=org/other-dino"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    for stage in ("captioner (llava-hf/llava-1.5-7b-hf)", "grounder (org/other-dino)", "segmenter (facebook/sam-vit-huge)"):
        assert stage in err
    cache = os.path.abspath("models")
    assert (f"`python -m pipeline models download --config coco --cache {cache} grounder.model=org/other-dino`"
            in err)
    assert f"captioner.models_dir={cache} grounder.models_dir={cache} segmenter.models_dir={cache}" in err


def test_gpu_stages_on_a_machine_without_gpus_name_the_override():
    from pipeline.config import ConfigError
    from pipeline.job import check_resources

    cfg = load_config("coco")
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, {"CPU": 16, "GPU": 0}, strict=True)
    assert ("stages captioner, grounder, segmenter ask for 3 GPUs and this machine has none; to run them on CPU "
            "add captioner.num_gpus=0 grounder.num_gpus=0 segmenter.num_gpus=0") in str(e.value)
    with pytest.raises(ConfigError, match=r"phrases 2 \(2 x num_cpus=1\)"):
        check_resources(cfg, {"CPU": 3, "GPU": 3}, strict=True)


def test_config_show_version_and_bundled_names_from_anywhere(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", "show", "coco", "shards.max_samples=7"]) == 0
    shown = capsys.readouterr().out
    assert "  max_samples: 7  # samples per shard" in shown and "  box_threshold: 0.25" in shown
    assert "batch_timeout_s: 1800.0  # time limit of one model stage batch" in shown
    assert yaml.safe_load(shown)["shards"]["prefix"] == "coco"  # the comments keep it valid YAML
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().split()[-1][0].isdigit()
    assert cli.main(["config", "show", "no-such-config"]) == 2
    assert "bundled configs: coco, coco-annotations, demo, folder, vg" in capsys.readouterr().err


def test_summary_is_printed_once_and_ray_is_quiet(tmp_path):
    """The CLI as a user runs it: Ray's start-up lines and Ray Data's banners stay out of the console."""
    import subprocess
    import sys

    from job_helpers import ROOT, worker_env

    paths = write_coco(tmp_path / "data", {"a.png": (24, 20)}, captions=False)
    run = subprocess.run([sys.executable, "-m", "pipeline", "curate", "--config", "demo", "--images",
                          str(paths["images"]), "--annotations", str(paths["annotations"]), "--out",
                          str(tmp_path / "out"), "--no-progress", "ray.num_cpus=1", "ray.task_cpus=0.5"],
                         cwd=ROOT, env={**os.environ, **worker_env()}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["written"] == 1  # stdout is exactly the summary
    assert run.stderr.count('"written"') == 0
    for noise in ("Progress bars disabled", "Token authentication", "Started a local Ray instance",
                  "execution finished"):
        assert noise not in run.stderr, run.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from job_helpers import ROOT, kill_marked, worker_env

    paths = write_coco(tmp_path / "data", {f"{i}.png": (24, 20) for i in range(12)}, captions=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "curate", "--config", "demo", "--images", str(paths["images"]),
           "--annotations", str(paths["annotations"]), "--output", str(out), "--no-progress",
           "impl.captioner=job_probes:SlowProbe", "captioner.enabled=true", "captioner.batch_size=1",
           "captioner.num_cpus=0.5", "shards.max_samples=1", "read.batch_size=1", "ray.num_cpus=2",
           "ray.task_cpus=0.5"]
    marker = uuid.uuid4().hex
    env = {**os.environ, **worker_env(), "USE_PROBE_DELAY": "0.5", "USE_TEST_RUN": marker}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # mid-run: the config snapshot is written just before the dataset starts, and the stages need
        # seconds more (12 images x 0.5 s); shards are not a signal, write tasks may all commit at the end
        deadline = time.time() + 200
        while not (out / "job_config.yaml").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        assert proc.poll() is None, "the job ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)  # a Ray worker of the interrupted run must not commit beside the rerun
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err, err[-3000:]
    resumed = subprocess.run(cmd, cwd=ROOT, env={**env, "USE_PROBE_DELAY": "0"}, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["written"] == 12, resumed.stderr[-2000:]




def test_console_script_shows_its_own_name():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("use-pipeline")
    if not script.exists():  # an install without the console scripts: the module form is the command
        script = None
    cmd = [str(script)] if script else [sys.executable, "-m", "pipeline"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {'use-pipeline' if script else 'python -m pipeline'}")
