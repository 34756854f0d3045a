import json

import numpy as np
import polars as pl
import pytest

from conftest import run_script
from sentiment.demo_data import demo_reviews
from sentiment.errors import SentimentError
from sentiment.predictor import Predictor

TEXTS = ["The acting was superb. I loved it.", "The plot was dreadful. Avoid it.",
         "It runs a little over two hours. " * 40 + "The score was beautiful. A real treat.",
         "The script was tedious. <br /><br />I hated it."]


def test_predictions_keep_input_order_and_label_names(trained_model):
    predictor = Predictor(str(trained_model))
    answers = predictor.predict(TEXTS)
    assert [a["label"] for a in answers] == ["positive", "negative", "positive", "negative"]
    for a in answers:
        assert set(a["scores"]) == {"negative", "positive"}
        assert a["score"] == max(a["scores"].values())
        assert sum(a["scores"].values()) == pytest.approx(1.0)


def test_sorted_batches_match_one_by_one_scoring(trained_model):
    texts = demo_reviews(50, seed=20)["review"].to_list()
    batched = Predictor(str(trained_model), batch_size=8, max_batch_tokens=200, precision="fp32").probabilities(texts)
    single = np.concatenate([Predictor(str(trained_model), batch_size=1, precision="fp32").probabilities([t])
                             for t in texts[:10]])
    np.testing.assert_allclose(batched[:10], single, atol=1e-5)
    assert (batched.argmax(1) == Predictor(str(trained_model), batch_size=50).probabilities(texts).argmax(1)).all()


def test_batches_keep_to_the_count_the_token_budget_and_the_padding_limit(trained_model):
    lengths = np.array([90, 256, 40, 250, 100, 200, 255, 254])

    def batches(**limits):
        return [[int(lengths[i]) for i in b] for b in Predictor(str(trained_model), **limits).batches(lengths)]

    # (3 + 1) x 256 > 1000 tokens; 100 would be padded to 250, 40 to 100: by more than a quarter
    assert batches(batch_size=16, max_batch_tokens=1000) == [[256, 255, 254], [250, 200], [100, 90], [40]]
    assert batches(batch_size=2, max_batch_tokens=4096) == [[256, 255], [254, 250], [200], [100, 90], [40]]


def test_calibration_temperature_is_applied(trained_model):
    predictor = Predictor(str(trained_model), precision="fp32")
    logits = predictor.logits(predictor.encode(["The plot was dreadful. Avoid it."]))
    z = logits[0] / predictor.settings.temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(predictor.probabilities(["The plot was dreadful. Avoid it."])[0], expected, rtol=1e-5)


def test_empty_texts_are_errors_not_crashes(trained_model):
    answers = Predictor(str(trained_model)).predict(["", None, "I loved it."])
    assert answers[0]["error"] and answers[1]["error"] and answers[2]["label"] == "positive"


def test_a_folder_that_is_not_a_classifier_is_refused(tmp_path, trained_model):
    with pytest.raises(SentimentError, match="no such model folder"):
        Predictor(str(tmp_path / "nowhere"))
    config = json.loads((trained_model / "config.json").read_text())
    config["architectures"] = ["DistilBertModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SentimentError, match="not a sequence classifier"):
        Predictor(str(tmp_path))


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


def test_int8_quantisation_scores_like_the_full_model(trained_model):
    texts = demo_reviews(60, seed=24)["review"].to_list()
    full = Predictor(str(trained_model)).probabilities(texts)
    int8 = Predictor(str(trained_model), quantize="int8").probabilities(texts)
    assert (full.argmax(1) == int8.argmax(1)).mean() >= 0.95
    assert np.abs(full - int8).max() < 0.2


def test_bf16_scores_like_fp32_and_bad_precisions_are_refused(trained_model):
    texts = demo_reviews(60, seed=25)["review"].to_list()
    fp32, bf16 = Predictor(str(trained_model), precision="fp32"), Predictor(str(trained_model), precision="bf16")
    ids = fp32.encode(texts)
    assert not np.array_equal(fp32.logits(ids), bf16.logits(ids))  # autocast really ran in bf16
    full, half = fp32.probabilities(texts), bf16.probabilities(texts)
    assert (full.argmax(1) == half.argmax(1)).mean() >= 0.95
    assert np.abs(full - half).max() < 0.05
    with pytest.raises(SentimentError, match="precision"):
        Predictor(str(trained_model), precision="fp16")
    with pytest.raises(SentimentError, match="pick one"):
        Predictor(str(trained_model), precision="bf16", quantize="int8")


def test_any_classification_folder_works_with_default_settings(tmp_path, trained_model):
    import shutil
    folder = tmp_path / "plain"
    shutil.copytree(trained_model, folder)
    (folder / "sentiment.json").unlink()  # a Hugging Face folder that train.py did not write
    predictor = Predictor(str(folder))
    assert predictor.labels == ["negative", "positive"]
    assert (predictor.settings.truncation, predictor.settings.temperature, predictor.max_length) == ("head", 1.0, 512)
    assert predictor.predict(["The acting was superb. I loved it."])[0]["label"] == "positive"
