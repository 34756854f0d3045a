"""Shared fixtures: generated review tables and one tiny model trained once per test session.

Nothing here downloads: the model is a 2-layer DistilBERT with a WordPiece vocabulary trained
on the generated reviews, built by `train.py --model tiny`. Plain helpers are in `helpers.py`.
"""

import os

import prefork
import pytest
import torch
from helpers import TINY, run_script

from sentiment.demo_data import demo_reviews


def pytest_configure(config):
    """Under pytest-xdist (`-n auto`, the README's command) each worker gets its share of the cores:
    two workers whose torch each ran a thread per core slowed some tests fivefold."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the scripts the tests start
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected (not skipped) on a machine without one, whatever -m says, unless the
    CPU smoke run of bench/gpu_check.sh asks for them."""
    if torch.cuda.is_available() or os.environ.get("SENTIMENT_GPU_TESTS_ON_CPU") == "1":
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session", autouse=True)
def scripts_forked_from_one_import():
    """The scripts' runs forked from a process that imported torch and transformers once (prefork.py),
    unless SENTIMENT_TESTS_PREFORK=0 asks for a fresh interpreter each time. Never beside a GPU: a
    process whose parent asked the CUDA driver anything may not use the device, and the GPU tests
    are what CUDA must not differ in."""
    if os.environ.get("SENTIMENT_TESTS_PREFORK") == "0" or torch.cuda.is_available():
        yield
        return
    prefork.start({**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    yield
    prefork.stop()


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
