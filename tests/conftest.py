"""Shared fixtures: generated review tables and one tiny model trained once per test session.

Nothing here downloads: the model is a 2-layer DistilBERT with a WordPiece vocabulary trained
on the generated reviews, built by `train.py --model tiny`. Plain helpers are in `helpers.py`.
"""

import pytest
from helpers import TINY, run_script

from sentiment.demo_data import demo_reviews


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
