"""The benchmark scripts still run: the prepared GPU check at toy size on the CPU, rehearsed in the
GPU machine's software."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import ROOT


def gpu_check_smoke(out, **env):
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_toy_size_in_the_gpu_machines_software(tmp_path):
    # Rehearsed in that machine's packages and versions, the wheels installed as they will be there:
    # the check once needed a package (httpx2, for Starlette's TestClient) that only this machine had.
    script = os.path.join(ROOT, "bench", "gpu_rehearsal.sh")
    result = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    figures = report["figures"]
    gpu_machines = re.search(r'"transformers==([^"]+)"', pathlib.Path(script).read_text()).group(1)
    assert report["software"]["transformers"] == gpu_machines  # the report names the versions it ran with
    assert set(figures) == {"mfu", "epoch", "vs_trainer", "vs_grouped", "vs_pipeline", "vs_offline", "vs_per_request"}
    assert all(value > 0 for value in figures.values())
    log = (tmp_path / "gpu_check.log").read_text()
    assert " passed" in log and "step failed" not in log and "| figure | measured | goal | met |" in log


@pytest.mark.slow
def test_a_failing_step_of_the_gpu_check_costs_none_of_the_others(tmp_path):
    # The first failing step ended the whole check: a failing GPU test would have cost every figure
    # of the one run a lent GPU allows.
    result = gpu_check_smoke(tmp_path, PYTEST_ADDOPTS="-k no_such_test")  # pytest finds no test: exit 5
    assert result.returncode == 1
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== step failed: 1. GPU tests" in log and log.rstrip().endswith("== failed steps: 1. GPU tests")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["figures"]["vs_trainer"] > 0
