import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from helpers import TINY, run_script
from sentiment import checkpointing, training
from sentiment.config import TrainArgs, parse_args
from sentiment.demo_data import demo_reviews
from sentiment.modeling import tiny_config


def read_log(folder):
    with open(folder / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_param_groups_exempt_biases_and_layernorm_from_weight_decay():
    model = AutoModelForSequenceClassification.from_config(tiny_config(100, ["a", "b"]))
    decay, no_decay = training.param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] or "layer_norm" in names[id(p)]
               for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flags_map_onto_train_args():
    args = parse_args(TrainArgs, "", ["--data", "x.csv", "--max-length", "128", "--skip-bad-rows",
                                      "--truncation", "tail", "--val-size", "200"])
    assert (args.data, args.max_length, args.skip_bad_rows, args.truncation, args.val_size) == \
        ("x.csv", 128, True, "tail", 200)


def test_train_end_to_end_writes_a_model_folder_pipeline_can_load(tmp_path):
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=11).write_csv(data)
    out = tmp_path / "out"
    run_script("train.py", "--data", str(data), "--output-dir", str(out), *TINY, "--warmup-ratio", "0.2")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentiment.json", "metrics.json",
                 "train_config.json", "log.jsonl"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95 and metrics["val_accuracy"] >= 0.95
    assert metrics["test"]["confusion_matrix"]["labels"] == ["negative", "positive"]
    assert sum(metrics["test"]["examples_per_class"].values()) == metrics["data"]["sizes"]["test"]
    assert metrics["train_samples_per_second"] > 0 and metrics["best_epoch"] in (0, 1)
    # Linear warmup to the peak at 20 % of the steps, then linear decay to zero.
    steps = [r for r in read_log(out) if "lr" in r]
    total = metrics["steps"]
    lrs = {r["step"]: r["lr"] for r in steps}
    assert lrs[total] == 0.0
    warm = int(0.2 * total)
    for step, lr in lrs.items():
        expected = 1e-3 * (step / warm if step < warm else (total - step) / (total - warm))
        assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12)

    from transformers import pipeline
    classify = pipeline("text-classification", model=str(out))
    answers = classify(["The acting was superb. I loved it.", "The plot was dreadful. Avoid it."])
    assert [a["label"] for a in answers] == ["positive", "negative"]


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = tmp_path / "reviews.csv"
    demo_reviews(400, seed=12).write_csv(data)
    flags = ["--data", str(data), *TINY, "--checkpoint-every", "7", "--eval-every", "5", "--keep-checkpoints", "3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_script("train.py", *flags, "--output-dir", str(straight))

    real_save = training.save_checkpoint

    def save_then_crash(accelerator, output_dir, state, config, tokenizer, keep):
        real_save(accelerator, output_dir, state, config, tokenizer, keep)
        if state.step == 28:  # mid-way through the second epoch (20 steps each)
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with pytest.raises(KeyboardInterrupt):
        training.train(parse_args(TrainArgs, "", [*flags, "--output-dir", str(crashed)]))
    assert [os.path.basename(c) for c in checkpointing.complete_checkpoints(crashed)] == \
        ["step-00000014", "step-00000021", "step-00000028"]

    resumed = run_script("train.py", *flags, "--output-dir", str(crashed), "--resume", "latest")
    assert "resumed from" in resumed.stdout and "at step 28" in resumed.stdout
    a, b = load_file(straight / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, crashed))
    assert ma["test_accuracy"] == mb["test_accuracy"] and ma["best_step"] == mb["best_step"]
    assert [r["step"] for r in read_log(straight)] == [r["step"] for r in read_log(crashed)]

    # A changed invariant is refused, not silently applied.
    refused = run_script("train.py", *flags, "--output-dir", str(crashed), "--resume", "latest", "--lr", "0.01",
                         check=False)
    assert refused.returncode == 2 and "--lr was 0.001, now 0.01" in refused.stderr


def test_a_crash_while_saving_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    data = tmp_path / "reviews.csv"
    demo_reviews(200, seed=13).write_csv(data)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.os, "replace", broken_replace)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with pytest.raises(OSError, match="disk full"):
        training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--checkpoint-every", "3",
                                                  "--output-dir", str(tmp_path / "out")]))
    assert checkpointing.complete_checkpoints(tmp_path / "out") == []
    assert os.listdir(tmp_path / "out" / "checkpoints") == [".tmp-step-00000003"]
    with pytest.raises(Exception, match="no complete checkpoint"):
        checkpointing.find_checkpoint("latest", tmp_path / "out")


@pytest.mark.slow
def test_two_processes_evaluate_the_same_samples_as_one(tmp_path):
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=14).write_csv(data)
    common = ["train.py", "--data", str(data), *TINY, "--batch-size", "8", "--epochs", "3"]
    run_script(*common, "--grad-accum", "2", "--output-dir", str(tmp_path / "one"))
    run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *common, "--output-dir", str(tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    config = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert config["num_processes"] == 2
    assert one["steps"] == two["steps"]
    for split in ("val", "test"):
        assert one[split]["examples"] == two[split]["examples"] == one["data"]["sizes"][split]
        assert one[split]["examples_per_class"] == two[split]["examples_per_class"]
        assert abs(one[split]["accuracy"] - two[split]["accuracy"]) <= 0.02
        assert two[split]["accuracy"] >= 0.95


@pytest.mark.parametrize("problem, flags, message", [
    ("missing file", ["--data", "nowhere.csv"], "nowhere.csv: no such file"),
    ("unknown column", ["--text-column", "body"], "no column 'body'; it has 'review', 'sentiment'"),
    ("bad value", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("over the position limit", ["--max-length", "1024"], "--max-length: 1024 tokens is over this model's limit of "
                                                          "512 positions"),
    ("busy output", [], "is not empty; pass --overwrite"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, reviews_csv, problem, flags, message):
    out = tmp_path / "out"
    out.mkdir()
    if problem == "busy output":
        (out / "something").write_text("x")
    result = run_script("train.py", "--data", str(reviews_csv), "--model", "tiny", "--output-dir", str(out), *flags,
                        check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_flag_has_help():
    result = run_script("train.py", "--help")
    for flag in ("--data", "--val-data", "--truncation", "--resume", "--report-to", "--checkpoint-every"):
        assert flag in result.stdout


def test_invariants_are_the_fields_marked_fixed():
    assert "lr" in checkpointing.INVARIANTS and "seed" in checkpointing.INVARIANTS
    assert "output_dir" not in checkpointing.INVARIANTS and "resume" not in checkpointing.INVARIANTS


def test_pretrained_weights_saved_in_bf16_train_in_fp32(tmp_path):
    from sentiment.modeling import load_model
    folder = tmp_path / "bf16"
    model = AutoModelForSequenceClassification.from_config(tiny_config(100, ["a", "b"]))
    model.to(torch.bfloat16).save_pretrained(folder)
    model = load_model(str(folder), ["a", "b"], 100)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
