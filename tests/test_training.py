import dataclasses
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import typing

import accelerate.data_loader
import numpy as np
import polars as pl
import pytest
import torch
from helpers import (ONE_PROCESS, ROOT, TINY, DeviceWaits, cudnn_attention_allowed, ephemeral_ports, free_port,
                     gloo_threads_left, hang_up_while_it_runs, recording_its_end, run_script, threads_at_exit,
                     two_processes, wrappers_alive_at_destroy)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from sentiment import checkpointing, launcher, modeling, outputs, training
from sentiment.config import InferArgs, TrainArgs, build_parser, parse_args
from sentiment.demo_data import demo_reviews
from sentiment.errors import SentimentError, flag
from sentiment.modeling import load_model_folder, load_tokenizer, save_model_folder, tiny_config
from sentiment.files import write_atomically
from sentiment.outputs import log_line, publish_model
from sentiment.predictor import Predictor


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


@pytest.mark.parametrize("cls, argv, named", [
    (TrainArgs, ["--data", ""], "--data"),
    (TrainArgs, ["--data", "x.csv", "--model", ""], "--model"),  # taken for a Hub id, refused by the Hub's rules
    (TrainArgs, ["--data", "x.csv", "--output-dir", " "], "--output-dir"),
    (TrainArgs, ["--data", "x.csv", "--text-column", ""], "--text-column"),
    (InferArgs, ["--model", "", "good"], "--model"),  # ": no such model folder"
    (InferArgs, ["--input", ""], "--input"),  # "nothing to score"
    (InferArgs, ["--input", "x.csv", "--output", ""], "--output"),  # printed to the terminal instead
])
def test_a_flag_given_an_empty_value_is_named_as_empty(cls, argv, named):
    # `--model "$MODEL"` with MODEL unset: each was taken at its word, and failed further on, or not at all.
    with pytest.raises(SentimentError, match=f"^{named} is empty \\(an unset shell variable\\?\\); give it a value$"):
        parse_args(cls, "", argv)


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


def test_rows_whose_text_the_tokenizer_keeps_nothing_of_are_left_out_and_counted(tmp_path):
    # A text of only zero-width or control characters is no text to the tokenizer: it was trained on,
    # and tested on, as a bare [CLS] [SEP] with a label, where inference refuses to score it.
    blank = ["\u200b", "\u200b\u200d", "\x07\x01", "\ufeff\u2060", "\u200b \u200b", "\u2060\u2060"]
    data = tmp_path / "reviews.csv"
    pl.concat([demo_reviews(400, seed=12), pl.DataFrame({"review": blank, "sentiment": ["positive", "negative"] * 3})
               ]).write_csv(data)
    out = tmp_path / "out"
    result = run_script("train.py", "--data", str(data), "--output-dir", str(out), *TINY, "--epochs", "1",
                        "--val-size", "0.25", "--test-size", "0.25")
    metrics = json.loads((out / "metrics.json").read_text())
    sizes, report = metrics["data"]["sizes"], metrics["data"]["data"]
    assert report["no_tokens"] == len(blank)
    assert sum(sizes.values()) == report["rows"] - report["bad_rows"] - report["duplicates"] - len(blank)
    assert sum(metrics["test"]["examples_per_class"].values()) == sizes["test"]
    left_out = re.findall(r"warning: (\d+) rows? of the (\w+) split left out: the tokenizer keeps nothing of "
                          r"(?:its|their) text", result.stderr)
    assert sum(int(n) for n, _ in left_out) == len(blank) and len(left_out) == len({s for _, s in left_out})


def test_training_rows_the_tokenizer_keeps_nothing_of_at_all_stop_the_run(tmp_path):
    # With every training row left out, the run trained for no step and published an untrained model as done.
    chars = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\x07"]
    texts = [a + b for a in chars for b in chars]
    data = tmp_path / "blank.csv"
    pl.DataFrame({"review": texts, "sentiment": ["positive", "negative"] * (len(texts) // 2)}).write_csv(data)
    result = run_script("train.py", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TINY,
                        "--val-size", "0", "--test-size", "0", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {data}: after leaving out the rows the tokenizer keeps nothing of, the training rows hold " \
           f"0 rows of 0 classes" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pipeline_on_the_model_folder_strips_markup_and_keeps_the_end_of_long_texts(trained_model):
    from transformers import AutoTokenizer, pipeline
    tokenizer = AutoTokenizer.from_pretrained(trained_model)
    assert tokenizer("a great<br /><br />film")["input_ids"] == tokenizer("a great film")["input_ids"]
    max_length = json.loads((trained_model / "sentiment.json").read_text())["max_length"]
    ending = tokenizer("but the ending was superb", add_special_tokens=False)["input_ids"]
    ids = tokenizer("dull " * 2000 + "but the ending was superb", truncation=True)["input_ids"]
    assert len(ids) == max_length and ids[-len(ending) - 1:-1] == ending  # cut from the left, at the trained length
    classify = pipeline("text-classification", model=str(trained_model), top_k=None)
    marked, plain = classify(["<p>The acting was <b>superb</b>.</p><br />I loved it.",
                              "The acting was superb . I loved it."])
    assert marked == plain


def killed_when(command, seen, seconds=120):
    """Run `command`, SIGKILL it the moment `seen()` is true; whether it was killed (not finished first)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        if seen():
            process.kill()
            break
    return process.wait() == -signal.SIGKILL


def kill_test_flags(data):
    return ["train.py", "--data", str(data), *TINY, "--checkpoint-every", "3", "--keep-checkpoints", "2",
            "--eval-every", "5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill tests' data, and the output of its run when nothing stops it: one run for all of them."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = folder / "reviews.csv"
    demo_reviews(600, seed=31).write_csv(data)
    run_script(*kill_test_flags(data), "--output-dir", str(folder / "whole"))
    return data, folder / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["saving a checkpoint", "deleting an old checkpoint", "training",
                                    "publishing the model"])
def test_a_run_killed_at_any_moment_resumes_to_the_same_model(tmp_path, moment, uninterrupted):
    # SIGKILL (the out-of-memory killer, a preempted machine) runs no cleanup at all.
    data, whole = uninterrupted
    flags = kill_test_flags(data)

    def names(prefix):
        checkpoints = out / "checkpoints"
        return [n for n in os.listdir(checkpoints) if n.startswith(prefix)] if checkpoints.is_dir() else []

    seen = {"saving a checkpoint": lambda: names("step-") and names(".tmp-step-"),
            "deleting an old checkpoint": lambda: names(".del-step-"),
            "training": lambda: len(names("step-")) == 2,
            "publishing the model": lambda: (out / ".tmp-model").is_dir()}[moment]
    for attempt in range(3):  # the moment lasts milliseconds: a poll can miss it, three in a row hardly
        out = tmp_path / f"killed-{attempt}"
        if killed_when([sys.executable, *flags, "--output-dir", str(out)], seen):
            break
    else:
        raise AssertionError(f"never caught the run {moment}")
    run_script(*flags, "--output-dir", str(out), "--resume", "latest")
    straight, resumed = (load_file(str(folder / "model.safetensors")) for folder in (whole, out))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    figures = [json.loads((folder / "metrics.json").read_text())["test"] for folder in (whole, out)]
    assert figures[0] == figures[1]
    assert not names(".") and not (out / ".tmp-model").exists() and not (out / ".publishing").exists()


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

    real_replace = os.replace

    def broken_replace(src, dst):  # the checkpoint's rename fails; other files are written as usual
        if ".tmp-step-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", broken_replace)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with pytest.raises(OSError, match="disk full"):
        training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--checkpoint-every", "3",
                                                  "--output-dir", str(tmp_path / "out")]))
    assert checkpointing.complete_checkpoints(tmp_path / "out") == []
    assert os.listdir(tmp_path / "out" / "checkpoints") == []  # the half checkpoint's space given back
    with pytest.raises(Exception, match="no complete checkpoint"):
        checkpointing.find_checkpoint("latest", tmp_path / "out")


def test_training_steps_and_evaluation_wait_for_the_device_only_to_log_and_evaluate(tmp_path, monkeypatch):
    # On a GPU each wait stops the CPU from queueing work ahead: transformers asked the device whether a
    # 2D padding mask held any padding before every forward pass, one wait a step, and a step took as long
    # as the CPU's work and the GPU's one after the other. Counted here on the CPU (helpers.DeviceWaits).
    data = tmp_path / "reviews.csv"
    demo_reviews(600, seed=4).write_csv(data)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with DeviceWaits() as spy:
        metrics = training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--checkpoint-every", "0",
                                                            "--output-dir", str(tmp_path / "out")]))
    assert metrics["steps"] == 60
    assert spy.within("forward") == []  # no forward pass, in training or evaluation
    loop = spy.within("train_recipe", outside=("setup", "cleanup"))
    logs, evaluations = 60 // training.LOG_EVERY, 2  # two waits a log line, a few at each evaluation
    assert len(loop) <= 2 * logs + 5 * evaluations < metrics["steps"]


def test_training_and_evaluation_attend_without_cudnn_whose_graphs_are_built_per_shape(tmp_path, monkeypatch):
    # cuDNN attention, PyTorch's first choice on Hopper GPUs, built a graph at each new batch width: about 170 ms
    # a step on an H200, on steps of 20 ms. Batches here are padded to their own longest text, so widths vary.
    data = tmp_path / "reviews.csv"
    demo_reviews(200, seed=4).write_csv(data)
    allowed = cudnn_attention_allowed(monkeypatch)
    training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--epochs", "1", "--checkpoint-every", "0",
                                              "--output-dir", str(tmp_path / "out")]))
    assert allowed and not any(allowed)  # training steps, validation and test, each layer
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and allowed again after the run, for other code


def test_two_process_launches_get_a_port_no_other_connection_can_take_first():
    # A port from bind(0) is ephemeral: another test's outgoing connection took one between the check and
    # torchrun listening on it, and a two-process test failed with EADDRINUSE.
    ports = [free_port() for _ in range(3)]
    assert len(set(ports)) == 3
    for port in ports:
        assert port not in ephemeral_ports()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and free
    launch = two_processes()
    assert int(launch[launch.index("--main_process_port") + 1]) not in ephemeral_ports()


@pytest.mark.slow
def test_two_processes_evaluate_the_same_samples_as_one(tmp_path):
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=14).write_csv(data)
    common = ["train.py", "--data", str(data), *TINY, "--batch-size", "8", "--epochs", "3"]
    run_script(*common, "--grad-accum", "2", "--output-dir", str(tmp_path / "one"))
    run_script(*two_processes(), *common, "--output-dir", str(tmp_path / "two"), env=threads_at_exit(tmp_path / "exit"))
    assert gloo_threads_left(tmp_path / "exit", "train.py") == [[], []]  # the group freed, as in infer.py
    assert wrappers_alive_at_destroy(tmp_path / "exit", "train.py") == [0, 0]  # and DDP's wrapper before it
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    config = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert config["num_processes"] == 2
    assert one["steps"] == two["steps"]
    for split in ("val", "test"):
        assert one[split]["examples"] == two[split]["examples"] == one["data"]["sizes"][split]
        assert one[split]["examples_per_class"] == two[split]["examples_per_class"]
        assert abs(one[split]["accuracy"] - two[split]["accuracy"]) <= 0.02
        assert two[split]["accuracy"] >= 0.95


# train.py, but process 1 reads reviews.other.csv where --data names reviews.csv: a machine of its own with its copy.
OWN_COPY = ("import os, runpy, sys; sys.argv = sys.argv[1:]; "
            "i = sys.argv.index('--data') + 1; "
            "sys.argv[i] = sys.argv[i].replace('.csv', '.other.csv') if os.environ['RANK'] == '1' else sys.argv[i]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_processes_that_read_different_data_stop_and_say_so(tmp_path):
    # Each process reads the data itself: two copies that differed by one review trained each process on
    # its own rows without a word (and rows more in one would hang it at the end of an epoch).
    data = tmp_path / "reviews.csv"
    reviews = demo_reviews(1200, seed=14)
    reviews.write_csv(data)
    first = pl.int_range(pl.len()) == 0
    reviews.with_columns(pl.when(first).then("Edited. " + pl.col("review")).otherwise("review").alias("review")
                         ).write_csv(tmp_path / "reviews.other.csv")
    wrapper = tmp_path / "own_copy.py"
    wrapper.write_text(OWN_COPY)
    launch = [*two_processes(), str(wrapper), os.path.join(ROOT, "train.py")]
    result = run_script(*launch, "--data", str(data), *TINY, "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode != 0 and "[rank0]: Traceback" not in result.stderr  # the launcher's own record is not ours
    assert (f"the processes of this run read different data: process 1 found other rows than process 0 in {data}; "
            f"give every machine the same copy") in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


# train.py, but in process 0 alone the disk is full when a checkpoint is put in place: only it writes there.
FULL_IN_PROCESS_0 = """
import errno, os, runpy, sys
sys.argv = sys.argv[1:]
real_replace = os.replace
def replace(src, dst):
    if ".tmp-step-" in str(src):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_replace(src, dst)
if os.environ["RANK"] == "0":
    os.replace = replace
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_when_one_process_stops_on_an_error_the_others_say_so_in_a_line(tmp_path):
    # Process 0 stopped with its one-line error; process 1, waiting for it at the checkpoint, ended in a
    # gloo traceback ("Connection closed by peer") longer than the error it hid.
    data = tmp_path / "reviews.csv"
    demo_reviews(600, seed=16).write_csv(data)
    wrapper = tmp_path / "full_in_0.py"
    wrapper.write_text(FULL_IN_PROCESS_0)
    result = run_script(*two_processes(), str(wrapper), os.path.join(ROOT, "train.py"), "--data", str(data), *TINY,
                        "--checkpoint-every", "5", "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode != 0
    assert result.stderr.count("error: the disk of") == 1, result.stderr[-3000:]
    assert "error: process 1: another process of this run ended" in result.stderr, result.stderr[-3000:]
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr


def test_a_warning_every_process_meets_is_said_once(tmp_path):
    # Each process of the launch reads the data and said the same warning, once a GPU.
    data = tmp_path / "rare.csv"
    pl.concat([demo_reviews(300, seed=8), pl.DataFrame({"review": ["A middling film, neither good nor bad."],
                                                        "sentiment": ["mixed"]})]).write_csv(data)
    result = run_script(*two_processes(), "train.py", "--data", str(data), *TINY, "--max-steps", "2",
                        "--output-dir", str(tmp_path / "out"), env={"PYTHONUNBUFFERED": "1"}, timeout=300)
    said = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert said == ["warning: few training rows for 'mixed' (1): a class needs some dozens to be learnt, and "
                    "figures for it from so few validation and test rows mean little"], result.stderr[-3000:]


@pytest.mark.parametrize("problem, flags, message", [
    ("missing file", ["--data", "nowhere.csv"], "nowhere.csv: no such file"),
    ("unknown column", ["--text-column", "body"], "no column 'body'; it has 'review', 'sentiment'"),
    ("bad value", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("over the position limit", ["--max-length", "1024"], "--max-length: 1024 tokens is over this model's limit of "
                                                          "512 positions"),
    ("busy output", [], "is not empty; pass --overwrite"),
    ("one column for both", ["--text-column", "sentiment"], "--text-column and --label-column are both 'sentiment'"),
    # A tracker that is not installed trained without logging, after a warning lost in the output;
    # one Accelerate does not know was a traceback.
    ("unknown tracker", ["--report-to", "no_such_tracker"], "--report-to no_such_tracker: Unsupported logging"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, reviews_csv, problem, flags, message):
    out = tmp_path / "out"
    out.mkdir()
    if problem == "busy output":  # an earlier run's
        (out / "train_config.json").write_text("{}")
    result = run_script("train.py", "--data", str(reviews_csv), "--model", "tiny", "--output-dir", str(out), *flags,
                        check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_no_number_flag_takes_a_value_that_is_not_finite(value):
    # argparse's float() takes them; --lr nan crashed AdamW, --weight-decay inf trained a model of NaNs to "done".
    hints = typing.get_type_hints(TrainArgs)
    numbers = [f.name for f in dataclasses.fields(TrainArgs) if hints[f.name] is float]
    assert {"lr", "weight_decay", "max_grad_norm", "warmup_ratio", "attention_dropout", "val_size"} <= set(numbers)
    for name in numbers:
        with pytest.raises(SentimentError, match=f"{flag(name)} must be a finite number, got {value}"):
            parse_args(TrainArgs, "", ["--data", "demo", f"{flag(name)}={value}"])
    for name in ("weight_decay", "max_grad_norm"):  # AdamW refuses the one with a traceback, clipping ignores the other
        with pytest.raises(SentimentError, match=f"{flag(name)} must be 0 or more, got -0.5"):
            parse_args(TrainArgs, "", ["--data", "demo", f"{flag(name)}=-0.5"])


def test_no_whole_number_flag_takes_a_value_that_overflows_the_libraries():
    # --batch-size 2**63 ended in a traceback from islice, --grad-accum 10**24 and infer.py's --chunk-rows
    # 10**30 in "OverflowError: int too big to convert".
    for cls, given in ((TrainArgs, ["--data", "demo"]), (InferArgs, ["some text"])):
        hints = typing.get_type_hints(cls)
        counts = [f.name for f in dataclasses.fields(cls) if hints[f.name] is int and f.name != "seed"]  # its own
        assert len(counts) >= 5
        for name in counts:
            with pytest.raises(SentimentError, match=f"{flag(name)} must be at most 4,294,967,295, got {2**63}"):
                parse_args(cls, "", [*given, flag(name), str(2**63)])
    assert parse_args(TrainArgs, "", ["--data", "demo", "--max-steps", str(2**32 - 1)]).max_steps == 2**32 - 1


def test_a_weight_decay_that_would_take_every_weight_away_is_refused():
    # --weight-decay 1e308 trained until the loss was NaN, and the error's advice was a lower --lr.
    with pytest.raises(SentimentError, match=re.escape("--weight-decay 1e+06 with --lr 2e-05: AdamW takes --lr × "
                                                       "--weight-decay (20) of every weight at each step")):
        parse_args(TrainArgs, "", ["--data", "demo", "--weight-decay", "1e6"])
    assert parse_args(TrainArgs, "", ["--data", "demo", "--weight-decay", "0.1", "--lr", "1e-3"]).weight_decay == 0.1


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused(seed):
    # It was "ValueError: Seed must be between 0 and 2**32 - 1", a traceback once the data was read.
    with pytest.raises(SentimentError, match=f"--seed must be from 0 to 4294967295, got {seed}"):
        parse_args(TrainArgs, "", ["--data", "demo", "--seed", seed])


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch, tmp_path):
    # Accelerate dropped it with a warning lost in the output, and the run logged nothing to it.
    import accelerate.tracking
    from accelerate.utils import LoggerType
    args = parse_args(TrainArgs, "", ["--data", "demo", "--report-to", "tensorboard", "--output-dir", str(tmp_path)])
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    with pytest.raises(SentimentError, match=r"--report-to tensorboard: no such tracker is installed here; install it "
                                             r"\(pip install tensorboard\)"):
        training.make_accelerator(args)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.TENSORBOARD])
    assert training.make_accelerator(args).log_with == [LoggerType.TENSORBOARD]


@pytest.mark.parametrize("flags, env", [
    (["--mixed-precision", "bf16"], {}),
    ([], {"ACCELERATE_MIXED_PRECISION": "bf16"}),  # as `accelerate launch` passes its config file's choice
])
def test_bf16_where_it_is_emulated_is_named_with_what_to_train_in_instead(flags, env):
    # accelerate_config.yaml asks for bf16; on a CPU without AVX512-BF16 or AMX (or a T4) it ran, slowly, unsaid.
    code = ("import sys; from sentiment import devices, training; from sentiment.config import TrainArgs, parse_args; "
            "devices.cpu_has_bf16 = lambda: False; "
            "print(training.make_accelerator(parse_args(TrainArgs, '', sys.argv[1:])).mixed_precision)")
    result = subprocess.run([sys.executable, "-c", code, "--data", "demo", *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env})
    assert result.stdout.split() == ["bf16"], result.stderr  # said, not refused: it still trains
    assert result.stderr.count("warning: bf16 mixed precision: this CPU has neither AVX512-BF16 nor AMX; bf16 is "
                               "emulated here, slower than fp32; train with --mixed-precision no") == 1


def test_labels_the_terminal_cannot_show_do_not_end_the_run(tmp_path):
    # Under a Latin-1 locale, Chinese label names ended the run with a UnicodeEncodeError as it printed them.
    frame = demo_reviews(200, seed=31)
    frame.with_columns(pl.col("sentiment").replace({"positive": "积极", "negative": "消极"})).write_csv(tmp_path / "d.csv")
    run_script("train.py", "--data", str(tmp_path / "d.csv"), *TINY, "--max-steps", "2", "--output-dir",
               str(tmp_path / "out"), env={"PYTHONIOENCODING": "latin-1"})
    assert json.loads((tmp_path / "out" / "sentiment.json").read_text(encoding="utf-8"))["labels"] == ["消极", "积极"]


def test_a_run_whose_standard_output_is_closed_trains_and_says_what_it_must_on_stderr(tmp_path):
    # `train.py … >&-` (Python makes sys.stdout None) ended at once with an AttributeError traceback.
    demo_reviews(200, seed=32).write_csv(tmp_path / "d.csv")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "d.csv"), *TINY,
               "--max-steps", "2", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", *command], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test_accuracy"] >= 0
    again = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", *command], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 2 and "Traceback" not in again.stderr and "--overwrite" in again.stderr


def test_early_stopping_without_validation_rows_is_refused():
    # It was accepted and did nothing: without validation rows no evaluation runs, so no run stopped early.
    with pytest.raises(SentimentError, match="--early-stopping-patience watches the validation accuracy, but "
                                             "--val-size is 0 and there is no --val-data"):
        parse_args(TrainArgs, "", ["--data", "demo", "--val-size", "0", "--early-stopping-patience", "2"])
    assert parse_args(TrainArgs, "", ["--data", "demo", "--val-size", "0", "--val-data", "val.csv",
                                      "--early-stopping-patience", "2"]).early_stopping_patience == 2


@pytest.mark.parametrize("where, message", [
    ("inside a file", "cannot write there (Not a directory)"),
    ("a file", "is a file; name a folder"),
])
def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, reviews_csv, where, message):
    out = reviews_csv / "out" if where == "inside a file" else reviews_csv
    result = run_script("train.py", "--data", str(reviews_csv), "--model", "tiny", "--output-dir", str(out),
                        check=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_that_is_a_file_is_named_as_one(tmp_path, reviews_csv):
    result = run_script("train.py", "--data", str(reviews_csv), "--model", str(reviews_csv),
                        "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and f"--model {reviews_csv} is a file; pass its folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_mistyped_model_folder_is_named_with_the_folder_meant(tmp_path, reviews_csv, trained_model):
    # A path that is no folder was taken for a Hub id: "Repo id must be in the form 'repo_name' or
    # 'namespace/repo_name'", then the Hub's own error for a relative one.
    parent = trained_model.parent
    typos = {f"{trained_model}x": f"no such folder (did you mean {trained_model}?)",
             f"{parent.name}/outt": f"no such folder (did you mean {parent.name}/out?), nor a Hub id that loads"}
    for typo, said in typos.items():
        result = run_script("train.py", "--data", str(reviews_csv), "--model", typo, "--output-dir",
                            str(tmp_path / "o"), check=False, cwd=parent.parent)
        said = f"--model {typo}: {said}"
        assert result.returncode == 2 and said in result.stderr, result.stderr[-2000:]
    scored = run_script("infer.py", "--model", f"{trained_model}x", "good", check=False)
    assert f"no such model folder (did you mean {trained_model}?)" in scored.stderr


def test_every_flag_has_help():
    result = run_script("train.py", "--help")
    for name in ("--data", "--val-data", "--truncation", "--resume", "--report-to", "--checkpoint-every"):
        assert name in result.stdout
    assert "(default: 2e-05)" in result.stdout  # --lr's default is shown; no default is said as "None"
    for command in (InferArgs, TrainArgs):
        text = " ".join(build_parser(command, "").format_help().split())
        assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text


def libraries_loaded(run, argv):
    """Run `run` (a runpy call) with `argv` in a fresh interpreter. Its stdout ends with "exit N" where it
    exits, then the list of torch, transformers, accelerate and polars it imported."""
    code = (f"import runpy, sys\ntry:\n    {run}\nexcept SystemExit as stop:\n    print('exit', stop.code)\n"
            f"print(sorted({{'torch', 'transformers', 'accelerate', 'polars'}} & set(sys.modules)))")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [["--help"], ["--no-such-flag"], ["--batch-size", "0"]])
@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_help_and_bad_flags_answer_before_torch_loads(script, argv):
    # Importing torch and transformers took 4.5 s here before `--help` or "unrecognized arguments" came.
    result = libraries_loaded(f"runpy.run_path({script!r}, run_name='__main__')", argv)
    assert result.stdout.splitlines()[-2:] == [f"exit {0 if argv == ['--help'] else 2}", "[]"], result.stderr


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


def test_pretrained_weights_the_files_lack_are_named_in_a_warning(tmp_path, capfd):
    # transformers starts them at random with a line in its log: a base whose weights were all named otherwise
    # trained from nothing. The new head, with another number of labels here, is no such weight.
    from sentiment.modeling import load_model
    folder = tmp_path / "base"
    AutoModelForSequenceClassification.from_config(tiny_config(100, ["a", "b"])).save_pretrained(folder)
    load_model(str(folder), ["x", "y", "z"], 100)
    assert "warning" not in capfd.readouterr().err
    weights = load_file(folder / "model.safetensors")
    del weights["distilbert.embeddings.word_embeddings.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    load_model(str(folder), ["x", "y", "z"], 100)
    assert (f"warning: {folder}: its weights file lacks 1 of the model's pretrained weights "
            f"(distilbert.embeddings.word_embeddings.weight); they start at random") in capfd.readouterr().err


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_a_model_is_trained_and_saved_as_a_single_label_classifier_whatever_its_base_said(tmp_path, problem_type):
    # Fine-tuned from a multi-label or regression checkpoint, the model kept that problem type: trained with
    # cross-entropy (a softmax over the labels), it was then scored with a sigmoid or raw by the pipeline,
    # and by the Predictor, which make the scores as the config says.
    from sentiment.metrics import output_function
    from sentiment.modeling import load_model
    folder = tmp_path / "base"
    config = tiny_config(100, ["a", "b", "c"])
    config.problem_type = problem_type
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    model = load_model(str(folder), ["negative", "positive"], 100)
    assert model.config.problem_type == "single_label_classification"
    assert output_function(model.config) == "softmax"


def file_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_model_folder_is_as_readable_as_the_umask_allows(tmp_path, trained_model, umask):
    # safetensors 0.8 writes its files 0600 whatever the umask: a service running as another user
    # could read the folder's configuration and tokenizer, but not its weights. As train.py
    # publishes it, then as saved under two umasks:
    assert file_mode(trained_model / "model.safetensors") == file_mode(trained_model / "config.json")
    saved = [path for path in (trained_model / "checkpoints").rglob("*") if path.is_file()]
    assert any(p.name == "best.safetensors" for p in saved)  # the checkpoints' weights were 0600 still
    assert {p.name: file_mode(p) for p in saved} == {p.name: file_mode(trained_model / "config.json") for p in saved}
    model, tokenizer, settings = load_model_folder(str(trained_model))
    previous = os.umask(umask)
    try:
        save_model_folder(str(tmp_path / "saved"), model, tokenizer, settings)
    finally:
        os.umask(previous)
    modes = {name: file_mode(tmp_path / "saved" / name) for name in os.listdir(tmp_path / "saved")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_a_model_file_this_user_may_not_read_is_named(trained_model, monkeypatch):
    # safetensors says "No such file or directory" of a weights file it may not open. (The tests run
    # as root, who may read anything, so the check's answer is what is faked.)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith(".safetensors")
                        and real_access(path, mode))
    with pytest.raises(SentimentError, match=r"may not read model\.safetensors; .*chmod a\+r"):
        load_model_folder(str(trained_model))


def test_a_model_folder_this_user_may_not_list_is_named(trained_model, monkeypatch):
    # os.listdir's PermissionError was a traceback.
    real_listdir = os.listdir

    def listdir(path):
        if str(path) == str(trained_model):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(SentimentError, match=r"may not list the folder; .*chmod a\+rX"):
        load_model_folder(str(trained_model))


def another_model(folder):
    """The model of `folder` with other weights and another temperature: a second publication, told apart."""
    model, tokenizer, settings = load_model_folder(str(folder))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.25)
    return model, tokenizer, dataclasses.replace(settings, temperature=settings.temperature * 3)


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_model_folder_left_half_moved_in_is_refused_and_a_live_move_is_waited_for(
        tmp_path, trained_model, monkeypatch):
    # The new model is moved in file by file; a kill between two renames left new and old files mixed,
    # which loaded without a word (new configuration and metrics, old weights and settings).
    out = tmp_path / "out"
    shutil.copytree(trained_model, out)
    real_replace, moved = os.replace, []

    def replace_then_killed(source, target):
        if len(moved) == 2:
            raise KeyboardInterrupt  # no cleanup runs after a SIGKILL either
        moved.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_killed)
    with pytest.raises(KeyboardInterrupt):
        publish_model(str(out), *another_model(out), {"test_accuracy": 0.5})
    monkeypatch.undo()
    assert len(moved) == 2
    marker = out / ".publishing"
    marker.write_text(f"{socket.gethostname()} {dead_pid()}\n")  # the writer is gone
    with pytest.raises(SentimentError, match=r"stopped while moving the new model in.*--resume latest"):
        Predictor(str(out))
    marker.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # the writer is alive: wait, then say so
    waits = []
    monkeypatch.setattr(modeling.time, "sleep", waits.append)
    with pytest.raises(SentimentError, match=r"a training run is moving a new model into this folder.*try again"):
        Predictor(str(out))
    assert len(waits) == 3


def test_a_model_published_while_it_loads_is_read_again_whole(tmp_path, trained_model, monkeypatch):
    # A service starting while train.py publishes into its folder took the old settings and the new weights.
    out = tmp_path / "out"
    shutil.copytree(trained_model, out)
    new_model, tokenizer, new_settings = another_model(out)
    real_load, loads = modeling.AutoModelForSequenceClassification.from_pretrained, []

    def published_meanwhile(folder, **kwargs):
        if not loads:
            publish_model(str(out), new_model, tokenizer, new_settings, {"test_accuracy": 0.5})
        loads.append(folder)
        return real_load(folder, **kwargs)

    monkeypatch.setattr(modeling.AutoModelForSequenceClassification, "from_pretrained", published_meanwhile)
    model, _, settings = load_model_folder(str(out))
    assert len(loads) == 2 and settings.temperature == new_settings.temperature
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), new_model.state_dict().values()))
    assert json.loads((out / "metrics.json").read_text()) == {"test_accuracy": 0.5}
    assert sorted(os.listdir(out)) == sorted(os.listdir(trained_model))  # no marker, no staging left


def test_a_pretrained_folder_without_tokenizer_files_is_refused(tmp_path, trained_model):
    # transformers would build a vocabulary of special tokens alone and train on [UNK] everywhere
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_model / name, tmp_path / name)
    with pytest.raises(SentimentError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path), [])


def test_tokens_added_to_a_tokenizer_alone_are_refused_for_scoring_and_learnt_in_training(tmp_path, trained_model):
    # A text with such a token was an IndexError traceback from infer.py; on a GPU, a device-side
    # assert after which every CUDA call of the process fails: the service would answer 500 for good.
    from transformers import AutoTokenizer
    base = tmp_path / "base"
    shutil.copytree(trained_model, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    have = len(tokenizer)
    tokenizer.add_tokens(["newword"])
    tokenizer.save_pretrained(base)
    with pytest.raises(SentimentError, match=re.escape(f"its tokenizer has {have + 1} tokens and its model "
                                                       f"embeddings for {have} of them")):
        Predictor(str(base))
    out = tmp_path / "out"
    trained = run_script("train.py", "--data", "demo", "--model", str(base), "--max-steps", "5",
                         "--max-length", "64", "--output-dir", str(out))
    # A warning, so on stderr with the others: on stdout it was lost to `train.py > log`.
    assert f"warning: {base}: its tokenizer has tokens its model has no embeddings for (1, added to" in trained.stderr
    assert load_model_folder(str(out))[0].get_input_embeddings().num_embeddings == have + 1
    assert Predictor(str(out)).predict(["a newword film"])[0]["label"] in ("negative", "positive")


def test_attention_dropout_is_set_whatever_the_architecture_calls_it(tmp_path):
    from transformers import BertConfig

    from sentiment.modeling import load_model
    folder = tmp_path / "bert"
    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    AutoModelForSequenceClassification.from_config(bert).save_pretrained(folder)
    for name, key in ((str(folder), "attention_probs_dropout_prob"), ("tiny", "attention_dropout")):
        default, changed = load_model(name, ["a", "b"], 100), load_model(name, ["a", "b"], 100, attention_dropout=0.0)
        assert (getattr(default.config, key), getattr(changed.config, key)) == (0.1, 0.0)
        rates = [{m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} for model in (default, changed)]
        assert rates[1] == rates[0] | {0.0}, name   # attention dropout off, hidden dropout still on
    with pytest.raises(SentimentError, match="--attention-dropout must be in"):
        TrainArgs(data="demo", attention_dropout=1.0)


# train.py run as on a GPU, with processes that collate the batches, though on a CPU.
WITH_LOADER_WORKERS = ("import runpy, sys; from sentiment import training; assert training.loader_workers; "
                       "training.loader_workers = lambda: 2; sys.argv = sys.argv[1:]; "
                       "runpy.run_path(sys.argv[0], run_name='__main__')")


def start_training(*flags, loader_workers=False):
    """train.py in the background, in a session of its own: a signal can be sent to all its processes."""
    python = [sys.executable, "-c", WITH_LOADER_WORKERS] if loader_workers else [sys.executable]
    return subprocess.Popen([*python, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def wait_for(path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_the_next_step_with_a_checkpoint_and_resume_continues(tmp_path, signum, status):
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    flags = ["--data", str(data), *TINY, "--output-dir", str(tmp_path / "out"), "--checkpoint-every", "0"]
    process = start_training(*flags)
    wait_for(tmp_path / "out" / "log.jsonl", process)  # training is under way (step 10 logged)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and f"\nstopped by {signal.Signals(signum).name} at step" in stderr  # its own line
    saved = checkpointing.complete_checkpoints(tmp_path / "out")
    assert len(saved) == 1 and str(saved[0]) in stderr
    resumed = run_script("train.py", *flags, "--resume", "latest")
    assert f"at step {checkpointing.step_of(saved[0])}" in resumed.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 2 * 60


# train.py whose end (freeing the device and the process group, which has hung on gloo's threads) takes
# half a minute: it touches the file named first when that begins.
SLOW_END = "\n".join([
    "import pathlib, runpy, sys, time",
    "from sentiment import training",
    "close, ending = training.FineTuneRecipe.close, pathlib.Path(sys.argv[1])",
    "def slow_close(self):",
    "    ending.touch()",
    "    time.sleep(30)",
    "    close(self)",
    "training.FineTuneRecipe.close = slow_close",
    "sys.argv = sys.argv[2:]",
    "runpy.run_path(sys.argv[0], run_name='__main__')"])


@pytest.mark.slow
@pytest.mark.parametrize("stopped", [True, False], ids=["stopped by a signal", "finished"])
def test_ctrl_c_twice_as_a_run_ends_stops_it_at_once_in_one_line(tmp_path, stopped):
    # The end of a run was outside the signal handlers: Ctrl-C while it ended, after the stop's checkpoint
    # or the model folder was written, met Python's own and ended in a KeyboardInterrupt's traceback.
    data, out, ending = tmp_path / "reviews.csv", tmp_path / "out", tmp_path / "ending"
    demo_reviews(1200 if stopped else 200, seed=15).write_csv(data)
    process = subprocess.Popen([sys.executable, "-c", SLOW_END, str(ending), os.path.join(ROOT, "train.py"),
                                "--data", str(data), *TINY, "--output-dir", str(out), "--checkpoint-every", "0"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wait_for(out / "log.jsonl" if stopped else ending, process)
    process.send_signal(signal.SIGINT)  # a first request to stop: at the next step, or none left as the run ends
    first = time.monotonic()
    wait_for(ending, process)
    time.sleep(max(0, first + training.SAME_SIGNAL_S + 0.2 - time.monotonic()))  # a second request, not a repeat
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    if stopped:
        assert len(checkpointing.complete_checkpoints(out)) == 1 and not (out / "metrics.json").exists()
        assert stderr.endswith("\nstopped at once by SIGINT, the second request to stop: the steps since the newest "
                               "checkpoint are lost; continue from it with --resume latest\n")
    else:
        assert "done: " in stdout and (out / "metrics.json").exists()
        assert stderr.endswith(f"\nstopped at once by SIGINT as the run ended, its model folder written: {out}\n")


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_every_process_of_a_run_stops_it_with_a_checkpoint(tmp_path, signum, status):
    # A terminal's Ctrl-C, Slurm, systemd and `timeout` signal the loader's worker processes (a GPU
    # run's) with the main one; a worker killed by SIGTERM ended the run in a traceback, checkpoint-less.
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    out = tmp_path / "out"
    process = start_training("--data", str(data), *TINY, "--output-dir", str(out), "--checkpoint-every", "0",
                             loader_workers=True)
    wait_for(out / "log.jsonl", process)
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and f"stopped by {signal.Signals(signum).name} at step" in stderr
    assert len(checkpointing.complete_checkpoints(out)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ONE_PROCESS], ids=["python", "accelerate launch"])
def test_a_terminal_that_closes_stops_the_run_with_a_checkpoint(tmp_path, launcher):
    # Its SIGHUP ended the run on the spot, losing the steps since the last checkpoint; once caught,
    # the progress bar's next write to the closed terminal (EIO) ended it checkpoint-less instead. Under
    # `accelerate launch` (1.16 on), standard error is a pipe to the launcher, which the hang-up ends: the
    # writes there failed (EPIPE), and the run ended in a traceback that no one saw, exit status 1.
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    out = tmp_path / "out"
    status = hang_up_while_it_runs(tmp_path, launcher, "train.py", "--data", str(data), *TINY, "--output-dir",
                                   str(out), "--checkpoint-every", "0", started=(out / "log.jsonl").exists)
    # Under the launcher, its death (SIGTERM) may come before the hang-up.
    assert status in ((str(128 + signal.SIGHUP), str(128 + signal.SIGTERM)) if launcher
                      else (str(128 + signal.SIGHUP),))
    assert len(checkpointing.complete_checkpoints(out)) == 1 and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_ctrl_c_to_a_run_piped_into_tee_stops_it_with_a_checkpoint(tmp_path):
    # Ctrl-C reaches `tee` too, which ends: the progress bar's next write into its pipe failed (EPIPE) and
    # ended the run without its checkpoint. TQDM_MININTERVAL=0 draws the bar at every step, as where a step
    # takes longer than the bar's refresh (a tenth of a second).
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    out = tmp_path / "out"
    command, its_end = recording_its_end(tmp_path, "train.py")
    flags = ["--data", str(data), *TINY, "--output-dir", str(out), "--checkpoint-every", "0"]
    pipeline = shlex.join([sys.executable, *command, *flags]) + f" 2>&1 | tee {shlex.quote(str(tmp_path / 'log'))}"
    shell = subprocess.Popen(["bash", "-c", pipeline], cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "TQDM_MININTERVAL": "0"})
    wait_for(out / "log.jsonl", shell)
    os.killpg(shell.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the pipeline
    shell.wait(timeout=120)
    assert its_end() == str(128 + signal.SIGINT)
    assert len(checkpointing.complete_checkpoints(out)) == 1 and not (out / "metrics.json").exists()


def test_under_nohup_a_hang_up_is_not_a_stop(tmp_path):
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "train.py", "--data", str(data), *TINY, "--output-dir", str(out),
                                "--checkpoint-every", "0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup
    wait_for(out / "log.jsonl", process)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert (out / "metrics.json").exists() and "stopped by" not in stderr


def test_repeats_of_a_signal_are_one_stop_and_a_later_signal_stops_at_once():
    # A terminal's Ctrl-C comes twice under torchrun (from the terminal and from the launcher) and
    # the kernel repeats a dead launcher's SIGTERM: as a second signal, either stopped the run at
    # once, without its checkpoint.
    received = []
    with training.stop_on_signals(received):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("a repeat of the first signal stopped the run at once")
        assert received == [signal.SIGTERM]
        time.sleep(training.SAME_SIGNAL_S + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
        assert received == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def pyo3_swallowing_the_interrupt():
    """What polars' Rust code did with a KeyboardInterrupt raised in its call back into Python (test_inference.py)."""
    try:
        time.sleep(1)  # the handler runs here at the latest
    except KeyboardInterrupt:
        raise TypeError("'<unprintable str object>' is not a Polars data type") from None


@pytest.mark.parametrize("became", [None, pyo3_swallowing_the_interrupt], ids=["an interrupt", "another error"])
def test_a_second_request_to_stop_ends_the_run_at_once_with_one_line_and_its_signal_s_status(capsys, became):
    # It ended with a KeyboardInterrupt's traceback and SIGINT's status whatever the signal; and where native code
    # had turned the interrupt into an error of its own, with that error's traceback and status 1.
    received = []
    with pytest.raises(SystemExit) as stop:
        with training.stop_on_signals(received):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(training.SAME_SIGNAL_S + 0.1)
            os.kill(os.getpid(), signal.SIGTERM)
            (became or time.sleep)(1)
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ("stopped at once by SIGTERM, the second request to stop: the steps since the "
                                       "newest checkpoint are lost; continue from it with --resume latest\n")
    with pytest.raises(TypeError):  # an error while no second stop was asked stays that error
        with training.stop_on_signals([signal.SIGINT]):
            raise TypeError("'<unprintable str object>' is not a Polars data type")


def test_the_sigterm_of_a_launcher_that_died_of_ctrl_c_is_not_a_second_request(monkeypatch):
    # Ctrl-C reaches `accelerate launch` too, which dies of it; its death's SIGTERM, should it come
    # a second or more later, stopped the run at once, in the middle of the checkpoint it was saving.
    monkeypatch.setattr(launcher, "followed", os.getppid() + 1)  # a parent that is no longer ours
    received = []
    with training.stop_on_signals(received):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(training.SAME_SIGNAL_S + 0.1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        except KeyboardInterrupt:
            pytest.fail("the launcher's death stopped the run at once")
    assert received == [signal.SIGINT]


@pytest.mark.parametrize("command, is_launcher", [
    ("/venv/bin/python3 /venv/bin/accelerate launch --num_processes 1 train.py", True),
    ("/venv/bin/python3 /venv/bin/accelerate-launch train.py", True),
    ("python -m accelerate.commands.launch train.py", True),
    ("/root/.local/bin/accelerate launch train.py", True),
    ("/bin/bash", False),  # `python train.py &`: a shell that exits must not stop the run
    ("python /venv/bin/accelerate config", False),
    ("python my_launcher.py launch accelerate", False),
])
def test_only_accelerate_s_launcher_is_followed(command, is_launcher):
    assert launcher.launched_by_accelerate(command.split()) == is_launcher


@pytest.mark.slow
def test_sigterm_to_a_one_process_accelerate_launch_stops_the_run_with_a_checkpoint(tmp_path):
    # The launcher died without passing SIGTERM on (`kill`, supervisord): the run went on to the end unseen.
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, *ONE_PROCESS, "train.py", "--data", str(data), *TINY,
                                "--output-dir", str(out), "--checkpoint-every", "0"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wait_for(out / "log.jsonl", process)
    process.terminate()  # the launcher
    _, stderr = process.communicate(timeout=120)  # the pipes close when train.py, which holds them, has ended
    assert "stopped by SIGTERM at step" in stderr, stderr[-3000:]
    assert len(checkpointing.complete_checkpoints(out)) == 1 and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_signal_to_every_process_of_a_two_process_run_stops_it_with_one_checkpoint_to_resume(tmp_path):
    # As a terminal's Ctrl-C or Slurm sends it: to the launcher and both ranks. The launcher's own
    # report of the signal is torch's (a traceback, exit status 1); the ranks stop together, with a checkpoint.
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=15).write_csv(data)
    flags = ["--data", str(data), *TINY, "--output-dir", str(tmp_path / "out"), "--checkpoint-every", "0"]
    process = subprocess.Popen([sys.executable, *two_processes(), "train.py", *flags], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                    **threads_at_exit(tmp_path / "exit")})
    wait_for(tmp_path / "out" / "log.jsonl", process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert stderr.count("stopped by SIGTERM at step") == 1, stderr[-3000:]
    assert gloo_threads_left(tmp_path / "exit", "train.py") == [[], []]  # the group freed, as at the end
    assert wrappers_alive_at_destroy(tmp_path / "exit", "train.py") == [0, 0]
    saved = checkpointing.complete_checkpoints(tmp_path / "out")
    assert len(saved) == 1 and str(saved[0]) in stderr
    resumed = run_script(*two_processes(), "train.py", *flags, "--resume", "latest")
    assert f"at step {checkpointing.step_of(saved[0])}" in resumed.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 2 * 30


@pytest.mark.slow
def test_overwrite_keeps_the_old_model_whole_until_the_new_one_is_ready(tmp_path, trained_model):
    out = tmp_path / "out"
    shutil.copytree(trained_model, out)
    shutil.rmtree(out / "checkpoints")
    before = Predictor(str(out)).predict(["The acting was superb. I loved it."])
    data = tmp_path / "other.csv"
    demo_reviews(1200, seed=16).write_csv(data)
    process = start_training("--data", str(data), *TINY, "--output-dir", str(out), "--overwrite",
                             "--checkpoint-every", "5")
    wait_for(out / "checkpoints" / "best.safetensors", process)  # a new best model exists, not yet published
    process.kill()
    process.communicate()
    assert Predictor(str(out)).predict(["The acting was superb. I loved it."]) == before  # was an IndexError


@pytest.mark.parametrize("how", ["--overwrite", "--resume PATH", "as it is"])
def test_a_run_into_a_folder_that_is_not_a_run_s_is_refused_and_its_files_kept(tmp_path, how, uninterrupted):
    # With --overwrite its files were deleted or replaced by the model's. Resumed from another run's checkpoint,
    # the run wrote its model into the folder, the user's config.json replaced. Without either, it was told to
    # pass --overwrite, and found a .lock file of the run's left among its files.
    data, whole = uninterrupted
    out = tmp_path / "project"
    (out / "checkpoints").mkdir(parents=True)
    files = {"config.json": '{"mine": 1}', "log.jsonl": "my log", "checkpoints/notes.txt": "keep me"}
    for name, text in files.items():
        (out / name).write_text(text)
    flags = {"--overwrite": ["--overwrite"], "as it is": [],
             "--resume PATH": ["--resume", str(checkpointing.complete_checkpoints(whole)[0])]}[how]
    result = run_script(*kill_test_flags(data), "--output-dir", str(out), *flags, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (f"error: --output-dir {out} holds files that are not a training run's (it has no "
                             f"train_config.json); a run would write its own among them, replacing any of the same "
                             f"name (config.json, model.safetensors); choose a new or empty folder\n")
    assert {name: (out / name).read_text() for name in files} == files
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "log.jsonl"]


def test_a_checkpoint_of_another_run_resumes_into_a_new_folder_but_not_over_another_run(tmp_path, uninterrupted):
    # Resumed into a new folder, a checkpoint failed with a FileNotFoundError (no checkpoints folder to restore
    # its best weights into); named with a slash at its end, as a shell completes it, or renamed, with a
    # ValueError from its name. Resumed into the folder of another run, it replaced that run's later
    # checkpoints and log without a word.
    data, whole = uninterrupted
    checkpoint = tmp_path / "kept by hand"
    shutil.copytree(checkpointing.complete_checkpoints(whole)[0], checkpoint)
    new = tmp_path / "new"
    run_script(*kill_test_flags(data), "--output-dir", str(new), "--resume", f"{checkpoint}{os.sep}")
    assert (new / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    other = tmp_path / "other"
    shutil.copytree(whole, other)

    def files():
        return {path: path.read_bytes() for path in other.rglob("*") if path.is_file() and path.name != ".lock"}

    before = files()
    refused = run_script(*kill_test_flags(data), "--output-dir", str(other), "--resume", str(checkpoint), check=False)
    assert refused.returncode == 2 and refused.stderr == (
        f"error: --resume {checkpoint} is not a checkpoint of the run in --output-dir {other}, whose checkpoints and "
        f"log resuming would replace; resume into a new or empty folder, or pass --overwrite to replace that run\n")
    assert files() == before
    run_script(*kill_test_flags(data), "--output-dir", str(other), "--resume", str(checkpoint), "--overwrite")
    assert (other / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_model_to_start_from_that_is_no_model_folder_is_one_line(tmp_path, uninterrupted):
    # A checkpoint as --model (its tokenizer loads) ended in transformers' ValueError traceback, as did a folder
    # whose config.json has no model_type; that folder, which exists, was also asked "did you mean" itself.
    data, whole = uninterrupted
    checkpoint = checkpointing.complete_checkpoints(whole)[0]
    odd = tmp_path / "odd"
    shutil.copytree(whole, odd, ignore=shutil.ignore_patterns("checkpoints"))
    (odd / "config.json").write_text("{}")
    for model, said in ((checkpoint, f"error: --model {checkpoint}: not a model folder (no config.json); it is a "
                                     f"training checkpoint: the model is written to its run's folder, {whole}, when "
                                     f"the run ends\n"),
                        (odd, f"error: --model {odd}: could not load this folder (Unrecognized model in {odd}.")):
        result = run_script(*kill_test_flags(data), "--model", str(model), "--output-dir", str(tmp_path / "out"),
                            check=False)
        assert result.returncode == 2 and result.stderr.startswith(said), result.stderr[-2000:]
        assert len(result.stderr.splitlines()) == 1


def test_a_run_that_stops_before_writing_anything_leaves_no_trace(tmp_path, reviews_csv):
    # Each left its output folder behind, made for it, holding a .lock file and nothing else; and refused
    # as not empty, a run left that file in the earlier run's folder.
    empty = tmp_path / "empty.csv"
    empty.write_text("review,sentiment\n")
    out = tmp_path / "outputs" / "model"
    result = run_script("train.py", "--data", str(empty), *TINY, "--output-dir", str(out), check=False)
    assert result.returncode == 2 and "too few rows" in result.stderr
    assert list((tmp_path / "outputs").iterdir()) == []
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "train_config.json").write_text("{}")
    result = run_script("train.py", "--data", str(reviews_csv), *TINY, "--output-dir", str(earlier), check=False)
    assert result.returncode == 2 and "is not empty; pass --overwrite" in result.stderr
    assert [p.name for p in earlier.iterdir()] == ["train_config.json"]
    run_script("train.py", "--data", str(reviews_csv), *TINY, "--max-steps", "2", "--output-dir", str(out))
    assert (out / "model.safetensors").exists() and (out / ".lock").exists()  # a run's folder keeps its lock


def test_overwrite_keeps_a_checkpoints_folder_behind_a_link_and_empties_it_of_checkpoints(tmp_path, uninterrupted):
    # Checkpoints moved to a larger disk, `checkpoints` a link to them: --overwrite ended in a traceback
    # ("Cannot call rmtree on a symbolic link"). Links where a run writes its own files (the model's staging
    # folder, the publishing marker) had their targets written into.
    data, whole = uninterrupted
    out, disk = tmp_path / "out", tmp_path / "larger disk"
    shutil.copytree(whole, out, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(whole / "checkpoints", disk)
    (out / "checkpoints").symlink_to(disk)
    (disk / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("mine")
    (out / ".tmp-model").symlink_to(elsewhere)
    (out / ".publishing").symlink_to(elsewhere / "config.json")
    old = sorted(p.name for p in disk.iterdir())
    run_script(*kill_test_flags(data), "--checkpoint-every", "4", "--output-dir", str(out), "--overwrite")
    assert (out / "checkpoints").is_symlink() and (disk / "notes.txt").read_text() == "mine"
    new = sorted(p.name for p in disk.iterdir())
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert new == ["best.safetensors", "notes.txt", f"step-{steps // 4 * 4 - 4:08d}", f"step-{steps // 4 * 4:08d}"]
    assert new != old and (elsewhere / "config.json").read_text() == "mine" and list(elsewhere.iterdir()) == [
        elsewhere / "config.json"]
    assert Predictor(str(out)).predict(["A fine film."])[0]["label"] in ("negative", "positive")


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    # The lock file is emptied for the run's process number: a .lock linked elsewhere had its target overwritten.
    target, folder = tmp_path / "precious.txt", tmp_path / "out"
    target.write_text("precious")
    folder.mkdir()
    (folder / ".lock").symlink_to(target)
    with pytest.raises(SentimentError, match=f"^--output-dir {folder}: its .lock is a symbolic link, which a run "
                                             f"would empty the target of; remove it$"):
        outputs.OutputLock(str(folder))
    assert target.read_text() == "precious"


def test_a_lock_let_go_and_removed_while_another_run_opened_it_is_not_held_twice(tmp_path, monkeypatch):
    # A run that lets go of a folder it wrote nothing in removes the lock file; a run that had opened that file
    # just before, then locked it, held a file no longer there, and a third run made a new one and started too.
    folder = tmp_path / "out"
    folder.mkdir()
    first = outputs.OutputLock(str(folder))
    flock = fcntl.flock

    def let_go_first(handle, operation):
        if first.handle.closed is False:
            first.close()  # between the second run's open and its lock
        return flock(handle, operation)

    monkeypatch.setattr(outputs.fcntl, "flock", let_go_first)
    second = outputs.OutputLock(str(folder))
    monkeypatch.setattr(outputs.fcntl, "flock", flock)
    with pytest.raises(SentimentError, match=f"--output-dir {folder} is in use by another training run \\(process "
                                             f"{os.getpid()}\\)"):
        outputs.OutputLock(str(folder))
    second.close()
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_two_runs_into_one_folder_the_second_is_refused(tmp_path):
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=17).write_csv(data)
    out = tmp_path / "out"
    # Epochs enough that the first is still training when the second starts: it once finished first.
    first = start_training("--data", str(data), *TINY, "--epochs", "100", "--output-dir", str(out))
    wait_for(out / "log.jsonl", first)
    second = run_script("train.py", "--data", str(data), *TINY, "--output-dir", str(out), "--overwrite", check=False)
    first.kill()
    first.communicate()
    assert second.returncode == 2 and "is in use by another training run" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1


def test_a_device_out_of_memory_is_one_line_that_says_what_to_lower(tmp_path, monkeypatch):
    def no_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training.FineTuneRecipe, "loss", no_memory)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    flags = ["--data", "demo", *TINY, "--batch-size", "32", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SentimentError, match=r"cpu ran out of memory at step 1 with batches of 32 texts \(twice that "
                                             r"to evaluate\) of up to 64 tokens; lower --batch-size"):
        training.train(parse_args(TrainArgs, "", flags))


def crashed_run(tmp_path, monkeypatch, at_step=14, *more):
    """Train with checkpoints every 7 steps and crash right after the one at `at_step`; returns the flags."""
    data = tmp_path / "reviews.csv"
    demo_reviews(400, seed=18).write_csv(data)
    flags = ["--data", str(data), *TINY, "--checkpoint-every", "7", "--keep-checkpoints", "5",
             "--output-dir", str(tmp_path / "out"), *more]
    real_save = training.save_checkpoint

    def save_then_crash(accelerator, output_dir, state, *args):
        folder = real_save(accelerator, output_dir, state, *args)
        if state.step == at_step:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with pytest.raises(KeyboardInterrupt):
        training.train(parse_args(TrainArgs, "", flags))
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    return flags


@pytest.mark.slow
def test_a_run_compiled_by_the_launcher_resumes_without_compiling(tmp_path):
    """`accelerate launch --dynamo_backend inductor` wraps the model in torch.compile: the copy of the best
    model must still carry the model's own weight names, or a resume without compiling cannot load it.
    Compiled here by dynamo and AOTAutograd as inductor's are, without the C++ build that inductor does on a
    CPU (61 s of this test; a GPU's code is Triton's)."""
    data, out = tmp_path / "reviews.csv", tmp_path / "out"
    demo_reviews(200, seed=19).write_csv(data)
    flags = ["--data", str(data), *TINY, "--epochs", "1", "--checkpoint-every", "5", "--output-dir", str(out)]
    run_script("train.py", *flags, env={"ACCELERATE_DYNAMO_BACKEND": "aot_eager", "ACCELERATE_DYNAMO_USE_DYNAMIC": "1"})
    compiled = load_file(out / "model.safetensors")
    assert load_file(checkpointing.best_weights(out)).keys() == compiled.keys()
    resumed = run_script("train.py", *flags, "--resume", "latest")  # the last checkpoint: only the best is reloaded
    assert "at step 10" in resumed.stdout
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], compiled[name]) for name in compiled)


def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_is_used(tmp_path, monkeypatch, capsys):
    flags = crashed_run(tmp_path, monkeypatch)
    newest = checkpointing.complete_checkpoints(tmp_path / "out")[-1]
    open(os.path.join(newest, "optimizer.bin"), "w").close()  # what a power cut can leave
    with open(tmp_path / "out" / "log.jsonl", "ab") as f:  # lines a disk or a hand left (each a traceback
        f.write(b'\xff\xfe\n{"step": "x"}\nnull\n{"step": 15, "lo')  # before), and one cut short by the crash
    training.train(parse_args(TrainArgs, "", [*flags, "--resume", "latest"]))
    captured = capsys.readouterr()
    assert f"checkpoint {newest} is damaged (optimizer.bin is empty)" in captured.err
    assert "resumed from" in captured.out and "at step 7" in captured.out
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and all(isinstance(step, int) for step in steps)


@pytest.mark.parametrize("file, content, problem", [
    ("trainer_state.json", {"step": 7, "best_step": None, "new_field": 1},
     "trainer_state.json has a field this version does not know, 'new_field': saved by another version"),
    ("trainer_state.json", {"step": "7"}, "trainer_state.json: step is '7', not a whole number"),
    ("trainer_state.json", [7], "trainer_state.json holds no fields"),
    ("train_config.json", 1, "train_config.json holds no settings"),
])
def test_a_checkpoint_whose_json_this_version_cannot_use_is_passed_over(tmp_path, capsys, file, content, problem):
    # Valid JSON of another shape (a checkpoint of another version, a hand edit) ended in a TypeError or an
    # AttributeError on resume, or later, in the loop, for a value of the wrong type.
    root = tmp_path / "checkpoints"
    for step in (3, 7):
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "train_seconds": 1, "best_step": None}))
        (folder / "train_config.json").write_text(json.dumps({}))
    newest = root / "step-00000007"
    (newest / file).write_text(json.dumps(content))
    assert checkpointing.find_checkpoint("latest", tmp_path) == str(root / "step-00000003")
    assert f"checkpoint {newest} is damaged (ValueError: {problem}" in capsys.readouterr().err
    with pytest.raises(SentimentError, match=re.escape(f"--resume {newest}: the checkpoint is damaged (ValueError: "
                                                       f"{problem}")):
        checkpointing.find_checkpoint(str(newest), tmp_path)
    assert checkpointing.read_state(str(root / "step-00000003")) == checkpointing.TrainState(step=3, train_seconds=1)


def test_a_damaged_random_state_is_reported_on_resume(tmp_path, monkeypatch, capsys):
    flags = crashed_run(tmp_path, monkeypatch)
    newest = checkpointing.complete_checkpoints(tmp_path / "out")[-1]
    with open(os.path.join(newest, "random_states_0.pkl"), "wb") as f:
        f.write(b"not a pickle")
    training.train(parse_args(TrainArgs, "", [*flags, "--resume", "latest"]))
    assert "will not repeat the interrupted one exactly" in capsys.readouterr().err


def test_resuming_an_older_checkpoint_forgets_the_newer_ones(tmp_path, monkeypatch):
    flags = crashed_run(tmp_path, monkeypatch, 21, "--eval-every", "5")
    out = tmp_path / "out"
    older = checkpointing.complete_checkpoints(out)[0]
    assert checkpointing.step_of(older) == 7
    best_then = load_file(os.path.join(older, checkpointing.BEST_WEIGHTS))

    def stop_after_setup(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.FineTuneRecipe, "train", stop_after_setup)
    with pytest.raises(KeyboardInterrupt):
        training.train(parse_args(TrainArgs, "", [*flags, "--resume", older]))
    assert [checkpointing.step_of(c) for c in checkpointing.complete_checkpoints(out)] == [7]
    best_now = load_file(checkpointing.best_weights(out))  # the best model as it stood at step 7
    assert all(torch.equal(best_now[name], best_then[name]) for name in best_then)


def test_a_changed_mixed_precision_is_refused_on_resume(tmp_path, monkeypatch):
    flags = crashed_run(tmp_path, monkeypatch)
    refused = run_script("train.py", *flags, "--resume", "latest", "--mixed-precision", "bf16", check=False)
    assert refused.returncode == 2 and "mixed precision in effect was no, now bf16" in refused.stderr


def test_data_edited_since_the_checkpoint_is_refused_on_resume(tmp_path, monkeypatch):
    # The same path with other rows would split differently: validation or test rows could enter training.
    flags = crashed_run(tmp_path, monkeypatch)
    data = tmp_path / "reviews.csv"
    frame = pl.read_csv(data)
    frame.with_columns(review=pl.when(pl.int_range(len(frame)) == 5).then(pl.col("review") + " Edited.")
                       .otherwise(pl.col("review"))).write_csv(data)
    refused = run_script("train.py", *flags, "--resume", "latest", check=False)
    assert refused.returncode == 2 and "the rows of the data files differ from the checkpoint's" in refused.stderr
    frame.write_csv(data)  # the rows as they were: the run goes on
    assert "resumed from" in run_script("train.py", *flags, "--resume", "latest").stdout


def test_a_kill_while_rotating_leaves_no_half_deleted_checkpoint_and_the_next_run_clears_it(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith(".del-step-"):
            raise KeyboardInterrupt  # the process dies while deleting the oldest checkpoint
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_midway)
    data = tmp_path / "reviews.csv"
    demo_reviews(400, seed=19).write_csv(data)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    flags = ["--data", str(data), *TINY, "--checkpoint-every", "5", "--keep-checkpoints", "1",
             "--output-dir", str(tmp_path / "out")]
    with pytest.raises(KeyboardInterrupt):
        training.train(parse_args(TrainArgs, "", flags))
    assert [checkpointing.step_of(c) for c in checkpointing.complete_checkpoints(tmp_path / "out")] == [10]
    # The half-deleted checkpoint (a whole checkpoint's size, optimizer state included) was never
    # removed: later rotations delete other steps. The next run into the folder clears it.
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    (tmp_path / "out" / "checkpoints" / ".tmp-step-00000007").mkdir()  # as a kill during a save leaves
    training.train(parse_args(TrainArgs, "", [*flags, "--resume", "latest"]))
    left = os.listdir(tmp_path / "out" / "checkpoints")
    assert not [name for name in left if name.startswith(".")], left


@pytest.mark.parametrize("found_at, nan_from, flags, finite_until", [
    ("a log line", 3, [], 0),
    ("a checkpoint", 7, ["--checkpoint-every", "7"], 0),
    ("an evaluation", 12, ["--eval-every", "5", "--checkpoint-every", "5"], 10),
])
def test_a_run_that_diverges_stops_and_saves_nothing_from_after_it(
        tmp_path, monkeypatch, found_at, nan_from, flags, finite_until):
    # A diverged run went on to the end, saving checkpoints of NaN weights that rotation kept over
    # the good ones, and could keep NaN weights as the best model.
    real_loss = training.FineTuneRecipe.loss

    def diverging(recipe, batch):
        loss = real_loss(recipe, batch)
        return loss * float("nan") if recipe.state.step + 1 >= nan_from else loss

    monkeypatch.setattr(training.FineTuneRecipe, "loss", diverging)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    data, out = tmp_path / "reviews.csv", tmp_path / "out"
    demo_reviews(400, seed=19).write_csv(data)
    with pytest.raises(SentimentError, match=f"the run diverged: .* between step {finite_until} and step "
                                             f"[0-9]+; nothing from after step {finite_until} was saved. "
                                             f"Train again .--overwrite. with a lower --lr .it is 0.001."):
        training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--keep-checkpoints", "1",
                                                  "--output-dir", str(out), *flags]))
    saved = [os.path.join(c, "model.safetensors") for c in checkpointing.complete_checkpoints(out)]
    if os.path.exists(checkpointing.best_weights(out)):
        saved.append(checkpointing.best_weights(out))
    assert len(saved) == (2 if found_at == "an evaluation" else 0)
    for path in saved:
        assert all(weights.isfinite().all() for weights in load_file(path).values()), path
    assert not (out / "model.safetensors").exists()


def test_a_full_disk_is_one_line_that_says_so(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(training.Accelerator, "save_state", full)
    data = tmp_path / "reviews.csv"
    demo_reviews(200, seed=20).write_csv(data)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with pytest.raises(SentimentError, match=r"the disk of .* is full .*continue with --resume latest") as caught:
        training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--checkpoint-every", "3",
                                                  "--output-dir", str(tmp_path / "out")]))
    # The progress bar was closed as the error left, not when its traceback is freed (`caught` holds it),
    # which is after the error is printed: the error's line is a line of its own.
    assert capsys.readouterr().err.endswith("\n") and caught.traceback


def half_written_then_full(path_of):
    """A writer that writes part of its file (at `path_of(its arguments)`) and then finds the disk full."""
    def write(*args, **kwargs):
        path = path_of(*args, **kwargs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("writing", ["a checkpoint", "the best weights", "the model folder"])
def test_a_full_disk_leaves_no_half_written_file_to_hold_its_space(tmp_path, monkeypatch, writing):
    # What was written before the disk filled stayed behind (a half checkpoint can be gigabytes),
    # holding the space the error asks the user to free.
    weights_in = lambda folder, *rest: os.path.join(folder, "model.safetensors")  # noqa: E731
    fake = {"a checkpoint": (training.Accelerator, "save_state", lambda self, folder: weights_in(folder)),
            "the best weights": (training.safetensors.torch, "save_model", lambda model, path: path),
            "the model folder": (outputs, "save_model_folder", weights_in)}
    where, name, path_of = fake[writing]
    monkeypatch.setattr(where, name, half_written_then_full(path_of))
    data = tmp_path / "reviews.csv"
    demo_reviews(200, seed=20).write_csv(data)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "out"
    with pytest.raises(SentimentError, match=r"the disk of .* is full .*continue with --resume latest"):
        training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--checkpoint-every", "3",
                                                  "--eval-every", "2", "--output-dir", str(out)]))
    left = [os.path.relpath(os.path.join(parent, name), out) for parent, folders, files in os.walk(out)
            for name in folders + files]
    assert not [name for name in left if ".tmp" in name], left


def test_small_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # metrics.json and train_config.json were written in place: a crash mid-write left half a file.
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomically(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    monkeypatch.undo()
    write_atomically(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_file_system_that_cannot_flush_a_folder_still_trains_and_scores(tmp_path, monkeypatch, reviews_csv):
    # fsync on a folder is EINVAL on CIFS shares, some FUSE mounts and Ceph volumes: the run failed at
    # its first checkpoint, and infer.py after writing its whole output, with a traceback.
    from sentiment import inference
    fsync = os.fsync

    def no_folder_flush(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_flush)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "out"
    training.train(parse_args(TrainArgs, "", ["--data", str(reviews_csv), *TINY, "--checkpoint-every", "3",
                                              "--output-dir", str(out)]))
    assert checkpointing.complete_checkpoints(out) and (out / "model.safetensors").exists()
    inference.run(parse_args(InferArgs, "", ["--model", str(out), "--input", str(reviews_csv),
                                             "--output", str(tmp_path / "scored.csv")]))
    assert len(pl.read_csv(tmp_path / "scored.csv")) == len(pl.read_csv(reviews_csv))

    def failing_disk(fd):  # a file's writeback error is not hidden
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomically(str(tmp_path / "metrics.json"), "{}")


def test_a_folder_that_cannot_be_locked_trains_with_a_warning(tmp_path, monkeypatch, reviews_csv, capsys):
    # flock on a network file system without a lock service is ENOLCK: the run ended in a traceback.
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outputs.fcntl, "flock", no_locks)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "out"
    training.train(parse_args(TrainArgs, "", ["--data", str(reviews_csv), *TINY, "--output-dir", str(out)]))
    assert (out / "model.safetensors").exists()
    assert (f"warning: --output-dir {out} cannot be locked (No locks available), so a second run into it would not "
            f"be refused") in capsys.readouterr().err


def test_names_that_are_not_utf8_are_one_line_before_anything_runs(tmp_path, trained_model, reviews_csv):
    # polars, tokenizers and transformers take UTF-8 names alone: a Latin-1 file name was a TypeError
    # traceback from infer.py and train.py, and an --output-dir one failed at the first checkpoint,
    # after the training steps, with a UnicodeEncodeError.
    from sentiment.config import ServeSettings
    latin1 = os.fsdecode(b"caf\xe9")
    data = tmp_path / f"{latin1}.csv"
    shutil.copy(reviews_csv, data)
    runs = {"--input": run_script("infer.py", "--model", str(trained_model), "--input", str(data), check=False),
            "--data": run_script("train.py", "--data", str(data), *TINY, "--output-dir", str(tmp_path / "out"),
                                 check=False),
            "--output-dir": run_script("train.py", "--data", str(reviews_csv), *TINY, "--output-dir",
                                       str(tmp_path / latin1), check=False)}
    for name, result in runs.items():
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert re.search(rf"^error: {name} \S*caf\\xe9\S*: not valid UTF-8 .*convmv", result.stderr, re.M), name
    assert not (tmp_path / latin1).exists() and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^SENTIMENT_MODEL=\S*caf\\xe9: not valid UTF-8"):
        ServeSettings(model=str(tmp_path / latin1))


def test_a_run_of_too_few_steps_to_learn_from_says_so(tmp_path):
    # A batch as large as the data trained for one step, and the model folder, as good as untrained,
    # was published without a word.
    data = tmp_path / "few.csv"
    demo_reviews(60, seed=3).write_csv(data)
    run = run_script("train.py", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--model", "tiny",
                     "--batch-size", "64", "--epochs", "1", "--max-length", "16", "--val-size", "0", "--test-size", "0")
    assert run.returncode == 0, run.stderr
    assert ("warning: 1 optimizer step in all (60 rows to train on, batches of 64, 1 epoch): too few to learn "
            "from; lower --batch-size, or raise --epochs") in run.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    args = TrainArgs(data="demo", batch_size=16, grad_accum=2, epochs=3)
    assert training.few_steps_warning(9, args, 40, 2) == (
        "9 optimizer steps in all (40 rows to train on, batches of 16 on each of 2 processes, 2 a step, "
        "3 epochs): too few to learn from; lower --batch-size or --grad-accum, or raise --epochs")
    assert training.few_steps_warning(10, args, 40, 2) is None
    assert training.few_steps_warning(2, TrainArgs(data="demo", max_steps=2), 40, 1) is None  # asked for


def test_the_last_short_accumulation_window_weighs_as_much_as_a_full_one():
    from accelerate import Accelerator
    # Five batches with --grad-accum 4: the last window holds one batch.
    assert [training.window_scale(i, 5, 4) for i in range(5)] == [1.0, 1.0, 1.0, 1.0, 4.0]
    assert [training.window_scale(i, 6, 4) for i in range(6)] == [1.0] * 4 + [2.0, 2.0]
    model = torch.nn.Linear(3, 1, bias=False)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    batches = [torch.full((2, 3), float(i + 1)) for i in range(5)]
    loader = accelerator.prepare(torch.utils.data.DataLoader(batches, batch_size=None))
    model = accelerator.prepare(model)
    grads = []
    for i, batch in enumerate(loader):
        with accelerator.accumulate(model):
            loss = model(batch).sum()
            accelerator.backward(loss * training.window_scale(i, len(loader), 4))
            if accelerator.sync_gradients:
                grads.append(model.weight.grad.clone())
                model.weight.grad = None
    # The lone last batch gives its own full gradient, not a quarter of it.
    torch.testing.assert_close(grads[1], torch.autograd.functional.jacobian(
        lambda w: (batches[4] @ w.T).sum(), model.weight.detach()))


def script_validation(monkeypatch, accuracies):
    """Make each validation of the training loop return the next of `accuracies` (and log it)."""
    scores = iter(accuracies)

    def scripted_validate(recipe):
        figures = {"accuracy": next(scores), "macro_f1": 0.5, "loss": 1.0}
        log_line(recipe.log_path, {"step": recipe.state.step, "split": "val", **figures})
        return figures

    monkeypatch.setattr(training.FineTuneRecipe, "validate", scripted_validate)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_early_stopping_stops_together_keeps_the_best_and_says_why(tmp_path, monkeypatch):
    data = tmp_path / "reviews.csv"
    demo_reviews(400, seed=21).write_csv(data)
    script_validation(monkeypatch, [0.5, 0.8, 0.7, 0.8, 0.6, 0.9, 0.95])  # best at the 2nd, then 3 without a better
    flags = ["--data", str(data), *TINY, "--epochs", "5", "--eval-every", "4", "--early-stopping-patience", "3",
             "--output-dir", str(tmp_path / "out"), "--checkpoint-every", "0"]
    metrics = training.train(parse_args(TrainArgs, "", flags))
    assert metrics["best_step"] == 8 and metrics["steps"] == 20  # evaluations at 4, 8, 12, 16, 20
    assert "no better validation accuracy in 3 evaluations since step 8" in metrics["stopped_early"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["stopped_early"] == metrics["stopped_early"]
    assert any(r.get("event") == "stop" for r in read_log(tmp_path / "out"))


def test_a_run_stopped_early_goes_on_when_resumed_with_more_patience(tmp_path, monkeypatch):
    data, out = tmp_path / "reviews.csv", tmp_path / "out"
    demo_reviews(400, seed=21).write_csv(data)
    script_validation(monkeypatch, [0.5, 0.8, 0.7, 0.7, 0.7] + [0.9] * 30)  # best at step 6; patience 3 stops at 15
    flags = ["--data", str(data), *TINY, "--epochs", "2", "--eval-every", "3", "--checkpoint-every", "3",
             "--output-dir", str(out)]
    first = training.train(parse_args(TrainArgs, "", [*flags, "--early-stopping-patience", "3"]))
    assert first["steps"] == 15 and first["stopped_early"]
    state = json.loads((out / "checkpoints" / "step-00000015" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (0, 15)  # the checkpoint holds where the run really was
    same = training.train(parse_args(TrainArgs, "", [*flags, "--early-stopping-patience", "3", "--resume", "latest"]))
    assert same["steps"] == 15 and same["stopped_early"]  # the same patience: still stopped
    again = training.train(parse_args(TrainArgs, "", [*flags, "--resume", "latest"]))
    assert again["steps"] > 20 and not again["stopped_early"]  # the second epoch ran as well


def test_batches_after_a_mid_epoch_resume_are_copied_to_the_device_without_waiting(tmp_path, monkeypatch):
    # Accelerate before 1.16 (setup.cfg allows 1.4) made the loader that skips the done batches with
    # blocking copies: on a GPU, a wait for the device at every step for the rest of that epoch.
    data, out = tmp_path / "reviews.csv", tmp_path / "out"
    demo_reviews(400, seed=21).write_csv(data)
    flags = ["--data", str(data), *TINY, "--epochs", "1", "--checkpoint-every", "5", "--keep-checkpoints", "100",
             "--output-dir", str(out)]
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    training.train(parse_args(TrainArgs, "", flags))
    copies = []

    def send_to_device(batch, device, non_blocking=False, **kwargs):
        copies.append(non_blocking)
        return real(batch, device, non_blocking=non_blocking, **kwargs)

    real = accelerate.data_loader.send_to_device
    monkeypatch.setattr(accelerate.data_loader, "send_to_device", send_to_device)
    resume = ["--resume", str(out / "checkpoints" / "step-00000005")]
    metrics = training.train(parse_args(TrainArgs, "", [*flags, *resume]))
    assert metrics["steps"] > 5 and len(copies) >= metrics["steps"] - 5
    assert all(copies)


def test_class_weights_raise_macro_f1_on_skewed_labels(tmp_path):
    # 90/10 labels and one weak cue: "dull" is in 70 % of the negative reviews and 20 % of the positive ones.
    # Unweighted, a negative with the cue is still the less likely class, so the model never says negative.
    rng = np.random.default_rng(0)
    words, rows = [f"word{i}" for i in range(40)], []
    for i in range(2000):
        label = "negative" if i % 10 == 0 else "positive"
        text = list(rng.choice(words, rng.integers(8, 16)))
        if rng.random() < (0.7 if label == "negative" else 0.2):
            text.insert(int(rng.integers(0, len(text))), "dull")
        rows.append((" ".join(text), label))
    data = tmp_path / "skewed.csv"
    pl.DataFrame(rows, schema=["review", "sentiment"], orient="row").write_csv(data)
    results = {}
    for weights in ("none", "auto"):
        out = tmp_path / weights
        run_script("train.py", "--data", str(data), *TINY, "--val-size", "0", "--test-size", "400",
                   "--class-weights", weights, "--output-dir", str(out))
        results[weights] = json.loads((out / "metrics.json").read_text())["test_macro_f1"]
        config = json.loads((out / "train_config.json").read_text())
    assert config["class_weight_values"]["negative"] == pytest.approx(5.0, rel=0.05)
    assert config["class_weight_values"]["positive"] == pytest.approx(0.555, rel=0.05)
    assert results["auto"] > results["none"] + 0.05, results


def test_the_report_shows_every_plot_and_training_says_how_to_get_it_without_matplotlib(tmp_path, trained_model,
                                                                                        monkeypatch, capsys):
    import base64
    import re
    import shutil

    from sentiment import report
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    report.main([str(folder)])
    page = (folder / "report.html").read_text()
    for title in ("Headline figures", "Training", "Validation", "Test", "Settings"):
        assert f"<h2>{title}</h2>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # loss and lr, validation, confusion matrix, reliability before and after
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    report.write_report_or_say_how(str(folder))
    assert 'report.html not written: pip install -e ".[report]"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # a user's mistake ends as train.py's and infer.py's do
        report.main([str(tmp_path)])
    assert exited.value.code == 2 and f"error: {tmp_path}: no log.jsonl" in capsys.readouterr().err


def test_rebuilding_the_report_loads_no_model_library(tmp_path, trained_model):
    # It reads two JSON files and plots them; through modeling's file names it imported torch and
    # transformers, 4.8 s of a 6 s rebuild here.
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder, ignore=shutil.ignore_patterns("report.html"))
    for argv, code_expected in ([str(folder)], None), (["--help"], 0), ([str(tmp_path)], 2):
        result = libraries_loaded("runpy.run_module('sentiment.report', run_name='__main__')", argv)
        assert result.stdout.splitlines()[-1] == "[]", (argv, result.stdout, result.stderr)
        if code_expected is not None:
            assert f"exit {code_expected}" in result.stdout, (argv, result.stdout)
    assert "<h2>Training</h2>" in (folder / "report.html").read_text()


def test_the_report_of_hundreds_of_classes_stays_small_and_a_failing_report_fails_no_run(tmp_path, trained_model,
                                                                                         monkeypatch, capsys):
    import base64
    import re
    import struct

    from sentiment import report
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    labels = [f"category {i}" for i in range(700)]  # 1,200 inches wide before: over matplotlib's 2^16 pixels
    metrics["test"]["confusion_matrix"] = {"labels": labels, "rows_true_columns_predicted": [
        [5 if i == j else 0 for j in range(len(labels))] for i in range(len(labels))]}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    report.main([str(folder)])
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', (folder / "report.html").read_text())
    confusion = base64.b64decode(images[2])
    width, height = struct.unpack(">II", confusion[16:24])  # the PNG header's size
    assert width <= 2000 and height <= 2000

    def broken(folder):
        raise ValueError("Image size of 132000x132000 pixels is too large")

    monkeypatch.setattr(report, "write_report", broken)
    report.write_report_or_say_how(str(folder))  # the end of a training run whose model is published: no raise
    assert "report.html not written (ValueError: Image size" in capsys.readouterr().err


def damage_report_inputs(folder, how):
    log, metrics = folder / "log.jsonl", json.loads((folder / "metrics.json").read_text())
    if how == "log bytes not utf-8":
        log.write_bytes(b"\xff\xfe{{{\n" + log.read_bytes())
    elif how == "log records not drawable":
        with log.open("a") as f:
            f.write('null\n[1]\n{"step": "x", "loss": 1, "lr": 1}\n{"split": "val", "step": 3}\n'
                    '{"step": 1, "loss": true, "lr": 0}\n')
    elif how == "metrics null":
        (folder / "metrics.json").write_text("null")
    elif how == "metrics not utf-8":
        (folder / "metrics.json").write_bytes(b"\xff{")
    elif how == "confusion matrix ragged":
        metrics["test"]["confusion_matrix"]["rows_true_columns_predicted"] = [[1], "x"]
        (folder / "metrics.json").write_text(json.dumps(metrics))
    elif how == "settings an array":
        (folder / "train_config.json").write_text("[1, 2]")


@pytest.mark.parametrize("how, error", [
    ("log bytes not utf-8", None), ("log records not drawable", None),
    ("metrics null", "metrics.json holds a JSON null, not an object"),
    ("metrics not utf-8", "metrics.json is not JSON (UnicodeDecodeError"),
    ("confusion matrix ragged", "metrics.json holds what the report cannot draw (ValueError"),
    ("settings an array", "train_config.json holds a JSON array, not an object")])
def test_a_report_rebuilt_from_damaged_files_passes_over_bad_log_lines_and_names_a_bad_file(tmp_path, trained_model,
                                                                                            capsys, how, error):
    # `python -m sentiment.report` ended in a traceback: UnicodeDecodeError for a log line of other bytes,
    # TypeError for a line of `null`, and the like for a metrics.json of another shape.
    import re

    from sentiment import report
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder, ignore=shutil.ignore_patterns("report.html"))
    damage_report_inputs(folder, how)
    if error is None:  # a line a crash cut short is passed over already; so is any line it cannot draw
        report.main([str(folder)])
        assert len(re.findall(r'src="data:image/png;base64,', (folder / "report.html").read_text())) == 4
        return
    with pytest.raises(SystemExit) as exited:
        report.main([str(folder)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: {folder}") and error in err, err
    assert len(err.strip().splitlines()) == 1 and not (folder / "report.html").exists()


def test_labels_with_dollar_signs_are_drawn_as_they_are_written(tmp_path, trained_model):
    # Price levels as labels: matplotlib read "$$" as mathematics and failed, so the run wrote no report;
    # "cost $5 to $10" came out in italics, its spaces gone.
    import re

    from sentiment import report
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    labels = ["$", "$$", "cost $5 to $10"]
    metrics["test"]["confusion_matrix"] = {"labels": labels, "rows_true_columns_predicted": [[3, 1, 0], [0, 2, 0],
                                                                                             [1, 0, 4]]}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    report.main([str(folder)])
    assert len(re.findall(r'src="data:image/png;base64,', (folder / "report.html").read_text())) == 4
    assert [report.as_text(label) for label in labels] == [r"\$", r"\$\$", r"cost \$5 to \$10"]


def test_offline_a_hub_model_in_the_cache_loads_and_one_that_is_not_fails_at_once(tmp_path, trained_model):
    # A Hub that does not resolve (.invalid never does): transformers retried each file for most of a minute,
    # before using the cache or failing. A model in the cache, laid out as huggingface_hub keeps it:
    cache, revision = tmp_path / "hub", "0" * 40
    repo = cache / "models--someone--tiny-sentiment"
    shutil.copytree(trained_model, repo / "snapshots" / revision,
                    ignore=shutil.ignore_patterns("checkpoints", "report.html", "log.jsonl", ".lock"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "",
           **{name: "" for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}}
    flags = ["--data", "demo", *TINY, "--epochs", "1"]
    run_script("train.py", *flags, "--model", "someone/tiny-sentiment", "--output-dir", str(tmp_path / "a"), env=env)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["test_accuracy"] >= 0.9
    missing = run_script("train.py", *flags, "--model", "someone/not-cached", "--output-dir", str(tmp_path / "b"),
                         env=env, check=False)
    assert missing.returncode == 2 and "Retry" not in missing.stderr
    assert "hub.invalid does not resolve from this machine, so only its local cache was looked in" in missing.stderr
