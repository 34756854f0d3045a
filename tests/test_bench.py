"""The benchmark scripts still run: the prepared GPU check at toy size on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_toy_size_on_a_cpu(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    figures = report["figures"]
    assert report["software"]["torch"] == torch.__version__  # the GPU machine has its own versions: said
    assert set(figures) == {"mfu", "epoch", "vs_trainer", "vs_grouped", "vs_pipeline", "vs_offline", "vs_per_request"}
    assert all(value > 0 for value in figures.values())
    log = (tmp_path / "gpu_check.log").read_text()
    assert "passed" in log and "| figure | measured | goal | met |" in log
