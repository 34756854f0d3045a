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


@pytest.mark.slow
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


@pytest.mark.parametrize("failing", ["1. GPU tests", "2. training", "3-4. scoring and serving"])
def test_a_failing_step_of_the_gpu_check_costs_none_of_the_others(tmp_path, failing):
    # The first failing step ended the whole check: a failing GPU test would have cost every figure
    # of the one run a lent GPU allows. Each step runs here in an interpreter that records it and
    # fails the one named; the real steps run in the rehearsal above.
    modules = {"1. GPU tests": "pytest", "2. training": "bench.gpu_train",
               "3-4. scoring and serving": "bench.gpu_score"}
    calls, python = tmp_path / "calls", tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$2" >> {calls}\n[ "$2" != {modules[failing]} ]\n')
    python.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python)})
    assert result.returncode == 1
    assert calls.read_text().split() == [*modules.values(), "bench.gpu_report"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert f"== step failed: {failing}" in log and log.rstrip().endswith(f"== failed steps: {failing}")


SHELL_COMMANDS = ["predict_sentiment.sh", "bench/gpu_check.sh", "bench/gpu_rehearsal.sh", "bench/gpu_wheels.sh",
                  "bench/full_scale.sh"]
PYTHON_COMMANDS = ["train.py", "infer.py", "sentiment.report"] + sorted(
    f"bench.{name[:-3]}" for name in os.listdir(os.path.join(ROOT, "bench"))
    if name.endswith(".py") and name not in ("__init__.py", "common.py", "pipeline_server.py"))


@pytest.mark.parametrize("command", SHELL_COMMANDS + PYTHON_COMMANDS)
def test_every_command_answers_help_and_does_nothing_else(tmp_path, command):
    # `bash bench/gpu_wheels.sh --help` deleted and downloaded the wheels, `gpu_check.sh --help` ran the
    # whole check, and `./predict_sentiment.sh --help` sent "--help" to the service as a review.
    if command.endswith(".sh"):  # each in a checkout of its own, with a wheel to lose
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
    if command.endswith(".sh"):
        assert os.listdir(root / ".whl") == ["kept-1.0-py3-none-any.whl"]
    assert not (tmp_path / "out").exists()
