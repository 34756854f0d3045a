"""The benchmark scripts still run: the prepared GPU check at toy size on the CPU, rehearsed in the
GPU machine's software."""

import fcntl
import getpass
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import ROOT


def listing(folder):
    return sorted((entry.name, entry.stat().st_mtime_ns) for entry in os.scandir(folder)) if os.path.isdir(folder) \
        else None


def checkout_with(tmp_path, *scripts):
    """A checkout of its own holding copies of `scripts` and a .whl/ of one wheel: what they do to .whl/
    or its lock, no other run (a rehearsal in another test worker) does at the same time."""
    root = tmp_path / "checkout"
    for script in scripts:
        (root / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, script), root / script)
    (root / ".whl").mkdir()
    (root / ".whl" / "kept-1.0-py3-none-any.whl").write_bytes(b"")
    return root


@pytest.mark.parametrize("script", ["gpu_rehearsal.sh", "gpu_wheels.sh"])
def test_a_second_gpu_rehearsal_waits_for_the_first_and_leaves_its_wheels_alone(tmp_path, script):
    # Two at once in one checkout: the second deleted and rebuilt .whl/ while the first installed from it.
    root = checkout_with(tmp_path, "bench/gpu_rehearsal.sh", "bench/gpu_wheels.sh")
    before = listing(root / ".whl")
    with open(root / "bench" / "gpu_wheels.sh") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a rehearsal under way holds it
        second = subprocess.Popen(["bash", str(root / "bench" / script)], cwd=root, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(3)
        waiting = second.poll() is None
        os.killpg(second.pid, signal.SIGKILL)
        _, stderr = second.communicate()
    assert waiting and "waiting for the other GPU rehearsal or wheel download" in stderr, stderr
    assert listing(root / ".whl") == before


def test_a_rehearsal_on_a_python_too_old_for_the_gpu_machine_s_wheels_says_so_before_it_installs(tmp_path):
    # Under Python 3.10 the rehearsal built its environment, then pip refused polars' runtime (cp311-abi3).
    root = checkout_with(tmp_path, "bench/gpu_rehearsal.sh", "bench/gpu_wheels.sh")
    python3 = tmp_path / "bin" / "python3"  # as 3.10 answers the version check; anything else is a step
    python3.parent.mkdir()
    python3.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 1\necho "python3 $*" >&2\nexit 3\n')
    python3.chmod(0o755)
    result = subprocess.run(["bash", str(root / "bench" / "gpu_rehearsal.sh")], cwd=root, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PATH": f"{python3.parent}:{os.environ['PATH']}"})
    assert result.returncode == 2 and "needs a python3 of 3.11 or later" in result.stderr, result.stderr
    assert listing(root / ".whl") == [("kept-1.0-py3-none-any.whl", (root / ".whl" / "kept-1.0-py3-none-any.whl")
                                       .stat().st_mtime_ns)]


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info < (3, 11), reason="the GPU machine's wheels (its Python is 3.12) need 3.11")
def test_the_gpu_check_runs_every_step_at_toy_size_in_the_gpu_machines_software(tmp_path):
    # Rehearsed in that machine's packages and versions, the wheels installed as they will be there:
    # the check once needed a package (httpx2, for Starlette's TestClient) that only this machine had.
    script = os.path.join(ROOT, "bench", "gpu_rehearsal.sh")
    scratch = tmp_path / "scratch"  # and no step leaves its temporary files: each run left a model folder
    scratch.mkdir()
    compiled = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")  # kept: a cache
    result = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OUT": str(tmp_path), "TMPDIR": str(scratch),
                                 "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", compiled)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert [name for name in os.listdir(scratch) if not name.startswith("torchinductor_")] == []  # headers cache
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    figures = report["figures"]
    gpu_machines = re.search(r'"transformers==([^"]+)"', pathlib.Path(script).read_text()).group(1)
    assert report["software"]["transformers"] == gpu_machines  # the report names the versions it ran with
    assert set(figures) == {"mfu", "epoch", "vs_trainer", "vs_grouped", "vs_pipeline", "vs_offline", "vs_per_request"}
    assert all(value > 0 for value in figures.values())
    log = (tmp_path / "gpu_check.log").read_text()
    assert " passed" in log and "step failed" not in log and "| figure | measured | goal | met |" in log


def gpu_check_with_fake_steps(tmp_path, behaviour, **env):
    """`gpu_check.sh --cpu-smoke` whose steps run in a fake interpreter: it records the module each step
    names (`-m MODULE`, its "$2"; the check's other calls, such as its probe for pytest-xdist, are not
    steps), then acts as the shell lines `behaviour` say. (result, modules called)."""
    calls, python = tmp_path / "calls", tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1" = -m ] && echo "$2" >> {calls}\n{behaviour}\n')
    python.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python), **env})
    return result, calls.read_text().split() if calls.exists() else []


@pytest.mark.parametrize("failing", ["1. GPU tests", "2. training", "3-4. scoring and serving"])
def test_a_failing_step_of_the_gpu_check_costs_none_of_the_others(tmp_path, failing):
    # The first failing step ended the whole check: a failing GPU test would have cost every figure
    # of the one run a lent GPU allows. Each step runs here in an interpreter that records it and
    # fails the one named; the real steps run in the rehearsal above.
    modules = {"1. GPU tests": "pytest", "2. training": "bench.gpu_train",
               "3-4. scoring and serving": "bench.gpu_score"}
    result, calls = gpu_check_with_fake_steps(tmp_path, f'[ "$2" != {modules[failing]} ]')
    assert result.returncode == 1
    assert calls == [*modules.values(), "bench.gpu_report"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert f"== step failed: {failing}" in log and log.rstrip().endswith(f"== failed steps: {failing}")


SHELL_COMMANDS = ["predict_sentiment.sh", "bench/gpu_check.sh", "bench/gpu_rehearsal.sh", "bench/gpu_wheels.sh",
                  "bench/full_scale.sh", ".ci/run", ".ci/lowest"]
PYTHON_COMMANDS = ["train.py", "infer.py", "sentiment.report"] + sorted(
    f"bench.{name[:-3]}" for name in os.listdir(os.path.join(ROOT, "bench"))
    if name.endswith(".py") and name not in ("__init__.py", "common.py", "pipeline_server.py", "hammer_peer.py",
                                             "bare_app.py"))  # the last three: apps uvicorn serves


@pytest.mark.parametrize("command", SHELL_COMMANDS + PYTHON_COMMANDS)
def test_every_command_answers_help_and_does_nothing_else(tmp_path, command):
    # `bash bench/gpu_wheels.sh --help` deleted and downloaded the wheels, `gpu_check.sh --help` ran the
    # whole check, and `./predict_sentiment.sh --help` sent "--help" to the service as a review; `.ci/run --help`
    # made a virtual environment in the checkout and installed the project into it.
    shell = not command.endswith(".py") and not command.startswith(("sentiment.", "bench."))
    if shell:  # each in a checkout of its own, with a wheel to lose
        root = checkout_with(tmp_path, command)
        argv = ["bash", str(root / command)]
    else:
        root = ROOT
        argv = [sys.executable, *([os.path.join(ROOT, command)] if command.endswith(".py") else ["-m", command])]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SENTIMENT_URL": "http://127.0.0.1:9"}
    result = subprocess.run([*argv, "--help"], cwd=root, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2 and "error" not in result.stderr.lower()
    if command.startswith("bench/gpu_"):  # a mistyped flag (--cpu-smok) ran the full check on the CPU
        mistyped = subprocess.run([*argv, "--cpu-smok"], cwd=root, capture_output=True, text=True, timeout=60,
                                  env=env)
        assert mistyped.returncode == 2 and mistyped.stderr.startswith("usage: bash " + command), mistyped.stderr
    if shell:
        folders = [str(p) for p in pathlib.Path(command).parents if str(p) != "."]
        assert sorted(str(path.relative_to(root)) for path in root.rglob("*")) == sorted(
            [".whl", ".whl/kept-1.0-py3-none-any.whl", *folders, command])
    assert not (tmp_path / "out").exists()


def test_a_step_over_its_time_limit_is_stopped_and_the_later_steps_still_run(tmp_path):
    # A step that hung (a deadlocked GPU test, a compile that never ends) took the whole device call with it.
    start = time.monotonic()
    result, calls = gpu_check_with_fake_steps(tmp_path, '[ "$2" = bench.gpu_train ] && exec sleep 120\nexit 0',
                                              STEP_LIMITS="30 2 30 30")
    assert time.monotonic() - start < 30
    assert result.returncode == 1
    assert calls == ["pytest", "bench.gpu_train", "bench.gpu_score", "bench.gpu_report"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "== step over its time limit of 2 s: 2. training" in log
    assert log.rstrip().endswith("== failed steps: 2. training")


@pytest.mark.parametrize("limits", ["30 2", "30 2 30 30 30", "30 two 30 30", "30 0 30 30"])
def test_step_limits_that_are_not_four_whole_seconds_are_refused_before_any_step(tmp_path, limits):
    # Three values ended the check in bash's "unbound variable" after the first steps had run.
    result, calls = gpu_check_with_fake_steps(tmp_path, "exit 0", STEP_LIMITS=limits)
    assert result.returncode == 2 and calls == []
    assert not (tmp_path / "out").exists()  # nor an output folder made, nor the wheels installed, first
    assert f"STEP_LIMITS must be four whole numbers of seconds, one per step, got '{limits}'" in result.stderr


def test_the_gpu_report_shows_what_was_measured_when_a_run_failed(tmp_path):
    ours = {"samples_s": 900.0, "tokens_s": 2.6e5, "mfu_measured": 0.4, "mfu_datasheet": 0.3, "epoch_25k_s": 27.8,
            "seconds": 30.0, "steady_samples_s": None}
    train = {"card": "NVIDIA H200", "precision": "bf16", "matmul_flops": 7e14, "datasheet_flops": 9.89e14,
             "runs": {"ours": ours, "Trainer": {**ours, "samples_s": 300.0}},
             "failed": {"Trainer grouped": "TypeError: an argument the Trainer no longer takes"},
             "step_anatomy": {"device_ms": 6.25, "wall_ms_4d_mask": 13.0, "wall_ms_2d_mask": 19.0,
                              "syncs": {"torch/nn/utils/clip_grad.py:96": 1}}}
    (tmp_path / "train.json").write_text(json.dumps(train))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_report", str(tmp_path / "train.json"),
                             str(tmp_path / "score.json"), "--json", str(tmp_path / "all.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not measured: vs_grouped, vs_pipeline" in result.stderr, result.stderr
    assert "| ours / Trainer, samples/s | 3.00 | 2.0 | yes |" in result.stdout
    assert "| ours / Trainer group_by_length, samples/s | not measured | 1.3 | - |" in result.stdout
    assert "failed: Trainer grouped: TypeError" in result.stdout and "score.json: no figures" in result.stdout
    assert ("one training step, ms: 13.0 end to end, the device busy 6.2 of it; 19.0 with the 2D mask"
            in result.stdout)
    assert "waits for the device in one step: torch/nn/utils/clip_grad.py:96 (1x)" in result.stdout
    assert json.loads((tmp_path / "all.json").read_text())["figures"]["vs_trainer"] == 3.0


def test_a_failing_training_run_costs_none_of_the_others_and_each_is_written_as_it_ends(tmp_path, monkeypatch):
    # One run's exception (a Trainer argument a transformers release renamed) ended the step and lost every figure.
    from bench import gpu_train
    report = tmp_path / "train.json"
    written_before = []

    def ours(data, folder, out, batch_size, steps, precision, compiled=None):
        if compiled:  # the last run: the ones before it are on disk already
            assert compiled == "eager"
            written_before.append(sorted(json.loads(report.read_text())["failed"]))
        return 10.0, 256 / 10.0, None

    def trainer(*args, **kwargs):
        raise TypeError("TrainingArguments.__init__() got an unexpected keyword argument")

    monkeypatch.setattr(gpu_train, "run_ours", ours)
    monkeypatch.setattr(gpu_train, "run_trainer", trainer)
    monkeypatch.setattr(gpu_train, "bf16_matmul_rate", lambda: 1e12)
    args = gpu_train.argparse.Namespace(rows=64, batch_size=8, steps=2, small=True, keep_model=None, json=str(report),
                                        compile_backend="eager")
    with pytest.raises(SystemExit, match="failed: Trainer, Trainer grouped"):
        gpu_train.measure(args, str(tmp_path))
    assert written_before == [["Trainer", "Trainer grouped"]]
    figures = json.loads(report.read_text())
    assert sorted(figures["runs"]) == ["ours", "ours compiled"]  # graphed runs, at two batch sizes, on a GPU alone
    anatomy = figures["step_anatomy"]  # run for real, on the CPU: no device time there
    assert anatomy["device_ms"] is None and min(anatomy["wall_ms_4d_mask"], anatomy["wall_ms_2d_mask"]) > 0
    sizes = anatomy["by_batch_size"]
    assert list(sizes) == ["8", "16"] and sizes["8"]["wall_ms_4d_mask"] == anatomy["wall_ms_4d_mask"]
    assert sizes["8"]["tokens_per_step"] < sizes["16"]["tokens_per_step"]
    assert "aten::addmm" in anatomy["profile"]  # the busiest operations, by name
    assert figures["failed"]["Trainer"].startswith("TypeError: TrainingArguments")


def test_a_failing_scoring_or_serving_part_costs_none_of_the_others(tmp_path, monkeypatch):
    from bench import gpu_score
    report = tmp_path / "score.json"

    def pipeline(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    on_disk = []

    def serve(name, *args):
        on_disk.append(json.loads(report.read_text())["scoring"])  # what a kill now would leave
        if name == "per-request":
            raise SystemExit("bench.pipeline_server:app did not start")  # as bench.serve.start_server says it
        return {"req_s": 500.0, "p50_ms": 120.0, "errors": 0}

    monkeypatch.setattr(gpu_score, "score_pipeline", pipeline)
    monkeypatch.setattr(gpu_score, "score_predictor", lambda model, texts, precision: (["a"] * len(texts), 800.0,
                                                                                       900.0))
    monkeypatch.setattr(gpu_score, "serve", serve)
    monkeypatch.setattr(sys, "argv", ["gpu_score", "--model", "unused", "--rows", "16", "--json", str(report)])
    with pytest.raises(SystemExit, match="failed: pipeline scoring, serving, per-request"):
        gpu_score.main()
    figures = json.loads(report.read_text())
    scoring = {"predictor_reviews_s": 800.0, "predictor_again_reviews_s": 900.0}
    assert figures["scoring"] == scoring and list(figures["serving"]) == ["ours", "ours, 4 workers"]
    assert figures["failed"]["serving, per-request"] == "SystemExit: bench.pipeline_server:app did not start"
    assert on_disk[0] == scoring  # the scoring figure was written before serving began


def test_a_server_that_exits_while_starting_is_reported_at_once(monkeypatch):
    # A benchmark's server that could not start (its port taken, its app broken) was polled for two minutes.
    from bench import serve
    polls, sleep = [], time.sleep
    monkeypatch.setattr(serve.time, "sleep", lambda seconds: polls.append(seconds) or sleep(seconds))
    with pytest.raises(SystemExit, match="no_such_module:app did not start"):
        serve.start_server("no_such_module:app", "unused")
    assert len(polls) < 100  # one poll each 0.2 s: exited within 20 s, not after the 120 s allowed
