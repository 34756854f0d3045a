"""Shared fixtures: generated review tables and one tiny model trained once per test session.

Nothing here downloads: the model is a 2-layer DistilBERT with a WordPiece vocabulary trained
on the generated reviews, built by `train.py --model tiny`.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from sentiment.demo_data import demo_reviews
from sentiment.predictor import Predictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Quick, reproducible settings for the tiny model; tests add or override flags.
TINY = ["--model", "tiny", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--max-length", "64",
        "--seed", "0"]


def run_script(*args, check=True, env=None, cwd=ROOT, **kwargs):
    """Run a top-level script of the project (`train.py`, `infer.py`, …) with this interpreter."""
    script = os.path.join(ROOT, args[0]) if args[0].endswith(".py") else args[0]
    result = subprocess.run([sys.executable, script, *args[1:]], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def reviews_csv(tmp_path):
    """A CSV of 600 generated reviews in the IMDb Kaggle layout."""
    path = tmp_path / "reviews.csv"
    demo_reviews(600, seed=1).write_csv(path)
    return path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A tiny model folder trained on generated reviews, shared by the inference and serving tests."""
    folder = tmp_path_factory.mktemp("model")
    data = folder / "reviews.csv"
    demo_reviews(1200, seed=2).write_csv(data)
    out = folder / "out"
    run_script("train.py", "--data", str(data), "--output-dir", str(out), *TINY)
    return out


class FakePredictor:
    """Stands in for `Predictor` in service tests that need a slow, failing or observable model."""

    labels = ["negative", "positive"]
    batch_size, max_batch_tokens, max_length = 16, 4096, 512

    def __init__(self, delay=0.0, gate=None):
        self.delay, self.gate, self.batches = delay, gate, []

    def probabilities(self, texts):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        if any("boom" in t for t in texts):
            raise ValueError("the model broke")
        self.batches.append(list(texts))
        return np.array([[0.1, 0.9] if "good" in t else [0.8, 0.2] for t in texts])

    def answer(self, probs):
        return Predictor.answer(self, probs)
