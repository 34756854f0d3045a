"""`infer.py`: texts and files in, scored rows and label metrics out."""

import json

import numpy as np
import polars as pl
import pytest
from helpers import run_script

from sentiment.demo_data import demo_reviews

TEXTS = ["The acting was superb. I loved it.", "The plot was dreadful. Avoid it."]


def test_infer_prints_json_lines_for_texts(trained_model):
    result = run_script("infer.py", "--model", str(trained_model), *TEXTS[:2])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["text"], r["label"]) for r in lines] == [(TEXTS[0], "positive"), (TEXTS[1], "negative")]
    assert set(lines[0]["scores"]) == {"negative", "positive"}


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "jsonl"])
def test_every_format_round_trips_with_other_columns_and_order(tmp_path, trained_model, ext):
    frame = demo_reviews(120, seed=21).with_row_index("id").with_columns(pl.col("id").cast(pl.String))
    source, target = tmp_path / f"in.{ext}", tmp_path / f"out.{ext}"
    write = {"csv": frame.write_csv, "tsv": lambda p: frame.write_csv(p, separator="\t"),
             "parquet": frame.write_parquet, "jsonl": frame.write_ndjson}[ext]
    write(source)
    metrics = tmp_path / "metrics.json"
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(source), "--output", str(target),
                        "--chunk-rows", "50", "--metrics-out", str(metrics))
    read = {"csv": pl.read_csv, "tsv": lambda p: pl.read_csv(p, separator="\t"), "parquet": pl.read_parquet,
            "jsonl": pl.read_ndjson}[ext]
    out = read(target)
    assert out["id"].cast(pl.String).to_list() == frame["id"].to_list()
    assert out["review"].to_list() == frame["review"].to_list()
    assert {"label", "score", "score_negative", "score_positive", "error"} <= set(out.columns)
    report = json.loads(metrics.read_text())
    assert report["examples"] == 120
    assert report["accuracy"] == pytest.approx((out["label"] == out["sentiment"]).mean())
    assert report["accuracy"] >= 0.9 and "accuracy" in result.stderr


def test_plain_text_from_stdin_and_empty_lines(trained_model):
    result = run_script("infer.py", "--model", str(trained_model), "--input", "-",
                        input="I loved it. The acting was superb.\n\nThe plot was awful. I hated it.\n")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["label"] for r in lines] == ["positive", None, "negative"]
    assert "empty text" in lines[1]["error"] and "1 rows had no text" in result.stderr


def test_a_file_larger_than_one_chunk_is_scored_like_one_chunk(tmp_path, trained_model):
    demo_reviews(230, seed=22).write_csv(tmp_path / "in.csv")
    for chunk in ("7", "10000"):
        run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "in.csv"),
                   "--output", str(tmp_path / f"out{chunk}.csv"), "--chunk-rows", chunk)
    small, whole = pl.read_csv(tmp_path / "out7.csv"), pl.read_csv(tmp_path / "out10000.csv")
    assert small["label"].to_list() == whole["label"].to_list()
    np.testing.assert_allclose(small["score"].to_numpy(), whole["score"].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--model", "nowhere", "hello"], "nowhere: no such model folder"),
    (["--input", "missing.csv"], "missing.csv: no such file"),
    (["--input", "{data}", "--text-column", "body"], "no column 'body'"),
    (["--input", "{data}", "--label-column", "stars"], "no label column 'stars'"),
    (["--input", "{data}", "--output", "out.xlsx"], "unknown file type"),
    ([], "give texts to score"),
    (["--max-length", "1024", "hello"], "--max-length: 1024 tokens is over this model's limit of 512 positions"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, trained_model, reviews_csv, flags, message):
    flags = [f.format(data=reviews_csv) for f in flags]
    if "--model" not in flags:
        flags = ["--model", str(trained_model), *flags]
    result = run_script("infer.py", *flags, check=False, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_processes_write_the_same_output_as_one(tmp_path, trained_model):
    demo_reviews(333, seed=23).write_csv(tmp_path / "in.csv")
    common = ["--model", str(trained_model), "--input", str(tmp_path / "in.csv"), "--chunk-rows", "100"]
    run_script("infer.py", *common, "--output", str(tmp_path / "one.csv"))
    run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "infer.py", *common,
               "--output", str(tmp_path / "two.csv"))
    one, two = pl.read_csv(tmp_path / "one.csv"), pl.read_csv(tmp_path / "two.csv")
    assert len(two) == 333
    assert one["review"].to_list() == two["review"].to_list()
    assert one["label"].to_list() == two["label"].to_list()
    np.testing.assert_allclose(one["score"].to_numpy(), two["score"].to_numpy(), atol=1e-6)
