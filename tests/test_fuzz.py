"""Seeded fuzzing of every input a user hands the project: table files, flags, model folders,
checkpoints and texts. The property is the same throughout: bad input is a `SentimentError` (one
line, exit status 2 at the command line), never a traceback from a library deep inside, and good
input is scored. Each case that once failed is also a test of its own; these look for the next one.
The seeds make every run the same; `FUZZ_CASES=10` (a multiplier) searches further.
"""

import contextlib
import datetime
import decimal
import glob
import json
import os
import random
import shutil

import polars as pl
import pytest

from sentiment import checkpointing, inference
from sentiment.config import InferArgs, parse_args
from sentiment.data import load_labelled
from sentiment.errors import SentimentError
from sentiment.predictor import Predictor

SCALE = int(os.environ.get("FUZZ_CASES", 1))


def cases(count):
    return range(count * SCALE)


@contextlib.contextmanager
def quiet():
    """Warnings and answers out of the way: a failure shows the case, not pages of rows."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield


def user_error_or_nothing(call, case):
    try:
        with quiet():
            call()
    except SentimentError:
        pass
    except Exception as err:
        raise AssertionError(f"{type(err).__name__} for {case}") from err


def score_file(model, path, output, *flags):
    inference.score_and_report(parse_args(InferArgs, "", ["--model", str(model), "--input", str(path),
                                                          "--output", str(output), *flags]))


PIECES = [b"review", b"sentiment", b",", b"\t", b"\n", b"\r\n", b"\r", b'"', b'""', b"positive", b"negative",
          b"\xef\xbb\xbf", b"\xff", b"\x00", b"{", b"}", b"[", b"]", b":", b'"review"', b"1", b"-1.5", b"nan",
          b"null", b"true", b" ", b"\xc3\xa9", b"\xe2\x80\x8b", b"a" * 100, b"'", b"\\", b"1e400",
          b'{"review": [1]}', b'{"review": null}', b'{"review": "x", "sentiment": 2}']
HEADS = [b"review,sentiment\n", b"review\tsentiment\n", b'{"review": "a", "sentiment": "positive"}\n',
         b'[{"review": "a", "sentiment": "positive"}', b"", b"PAR1", b"review\n", b'"review" x,sentiment\n']


def test_table_files_of_random_bytes_are_read_or_refused_in_a_line(tmp_path, trained_model):
    # Found: a CSV header with a stray quote ended training in a traceback from the csv module.
    rng = random.Random(12)
    for i in cases(120):
        ext = rng.choice([".csv", ".tsv", ".jsonl", ".json", ".txt", ".parquet"])
        body = rng.choice(HEADS) + b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 60)))
        path = tmp_path / f"t{i}{ext}"
        path.write_bytes(body)
        case = f"{ext} file {body[:200]!r}"
        user_error_or_nothing(lambda: load_labelled(str(path), "review", "sentiment"), case)
        user_error_or_nothing(lambda: load_labelled(str(path), "review", "sentiment", skip_bad_rows=True), case)
        user_error_or_nothing(lambda: score_file(trained_model, path, tmp_path / "out.csv", "--chunk-rows", "3"), case)


COLUMNS = {
    "int8": pl.Series([1, None, -3], dtype=pl.Int8),
    "uint64": pl.Series([2**64 - 1, 0, None], dtype=pl.UInt64),
    "float32": pl.Series([1.5, float("nan"), None], dtype=pl.Float32),
    "decimal": pl.Series([decimal.Decimal("1.10"), None, decimal.Decimal("-2.5")]),
    "bool": pl.Series([True, None, False]),
    "date": pl.Series([datetime.date(2020, 1, 1), None, datetime.date(1, 1, 1)]),
    "datetime": pl.Series([datetime.datetime(2020, 1, 1, 12)] * 3).dt.replace_time_zone("Europe/Paris"),
    "duration": pl.Series([datetime.timedelta(seconds=1), None, datetime.timedelta(days=-1)]),
    "time": pl.Series([datetime.time(1, 2, 3), None, datetime.time(0)]),
    "binary": pl.Series([b"\x00\xff", None, b""]),
    "categorical": pl.Series(["a", None, "c"], dtype=pl.Categorical),
    "list": pl.Series([["a", "b\tc"], None, []]),
    "list_of_bytes": pl.Series([[b"a"], None, []]),
    "array": pl.Series([[1, 2], None, [5, 6]], dtype=pl.Array(pl.Int64, 2)),
    "struct": pl.Series([{"a": 1, "b": "\t"}, None, {"a": None, "b": None}]),
    "null": pl.Series([None] * 3, dtype=pl.Null),
    "text": pl.Series(["1,2", '"q"', "a\nb"]),
}


def test_parquet_columns_of_every_type_are_written_whole_or_refused_in_a_line(tmp_path, trained_model):
    # Found: bytes written to CSV or JSON lines, durations to CSV (a traceback, or a panic in polars' Rust),
    # and a 'sentiment' column of lists taken for the labels (a cast error).
    rng = random.Random(2)
    readers = {".csv": lambda p: pl.read_csv(p, infer_schema=False),  # rows counted, as text
               ".tsv": lambda p: pl.read_csv(p, separator="\t", quote_char=None, infer_schema=False),
               ".jsonl": pl.read_ndjson, ".json": pl.read_json, ".parquet": pl.read_parquet}
    for i in cases(40):
        frame = pl.DataFrame({"review": ["a good film", None, "fine"]})
        for kind in rng.sample(sorted(COLUMNS), rng.randint(1, 3)):
            name = rng.choice([kind, kind, "sentiment", "label", "score"])
            frame = frame.with_columns(COLUMNS[kind].alias(name))
        frame.write_parquet(tmp_path / "in.parquet")
        ext = rng.choice(sorted(readers))
        output = tmp_path / f"out{i}{ext}"
        case = f"columns {frame.schema} into {ext}"
        user_error_or_nothing(lambda: score_file(trained_model, tmp_path / "in.parquet", output,
                                                 "--chunk-rows", rng.choice(["1", "100"])), case)
        if output.exists():
            assert len(readers[ext](output)) == 3, case


FLAG_VALUES = {
    "--batch-size": ["0", "1", "7", str(2**63), "nan", ""], "--max-batch-tokens": ["1", "7", str(2**40), "-1"],
    "--max-length": ["1", "8", "513", "99999"], "--threads": ["0", "1", "1000"], "--chunk-rows": ["1", str(10**30)],
    "--device": ["cpu", "cuda", "cuda:1", "mps", "meta", "cpu:1", "", "xla"], "--quantize": ["int8", "x"],
    "--precision": ["auto", "fp32", "bf16", "fp16", "int8"], "--text-column": ["review", "sentiment", "", "x"],
    "--label-column": ["sentiment", "review", "", "x"],
}


def test_infer_flags_of_any_value_score_or_are_refused_in_a_line(tmp_path, trained_model, reviews_csv):
    # Found: --chunk-rows 10**30 ended in polars' OverflowError, after the model had loaded.
    rng = random.Random(3)
    for _ in cases(150):
        argv = ["--model", str(trained_model)]
        for flag, values in FLAG_VALUES.items():
            if rng.random() < 0.25:
                argv += [flag, rng.choice(values)]
        argv += rng.choice([["--input", str(reviews_csv)], ["a good film", "a bad one"],
                            ["--input", str(reviews_csv), "--output", str(tmp_path / "out.jsonl")]])

        def run():
            try:
                inference.score_and_report(parse_args(InferArgs, "", argv))
            except SystemExit as err:  # argparse's own refusals
                assert err.code == 2
        user_error_or_nothing(run, f"infer.py {' '.join(argv)}")


JSON_VALUES = [None, 0, 1, -1, 1.5, "", "x", "head", [], {}, [1], ["a", "a"], ["negative", "positive", "x"], True,
               10**20, "512", 8, 513]


def test_model_folders_with_any_json_value_changed_load_or_are_refused_in_a_line(tmp_path, trained_model):
    # Found: a weights file lacking a weight scored with it at random; architectures or model_max_length of
    # the wrong type ended in a TypeError.
    rng = random.Random(4)
    files = ("config.json", "model.safetensors", "sentiment.json", "tokenizer.json", "tokenizer_config.json")
    config_keys = ["architectures", "id2label", "label2id", "max_position_embeddings", "vocab_size", "problem_type",
                   "num_labels", "pad_token_id", "dim", "dtype"]
    for i in cases(60):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        for name in files:
            shutil.copy(trained_model / name, folder)
        target = rng.choice(["sentiment.json", "config.json", "tokenizer_config.json"])
        doc = json.loads((folder / target).read_text())
        keys = config_keys if target == "config.json" else [*doc, "model_max_length"]
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(keys)
            if rng.random() < 0.15:
                doc.pop(key, None)
            else:
                doc[key] = rng.choice(JSON_VALUES)
        (folder / target).write_text(json.dumps(doc))
        user_error_or_nothing(lambda: Predictor(str(folder)).predict(["a good film", ""]), f"{target}: {doc}")
        shutil.rmtree(folder)


def test_checkpoints_with_any_json_value_changed_resume_or_are_passed_over(tmp_path, trained_model):
    # Found: a field this version does not know, a value of the wrong type or JSON that is not an object
    # ended --resume in a TypeError or an AttributeError.
    rng = random.Random(5)
    source = sorted(glob.glob(str(trained_model / "checkpoints" / "step-*")))[-1]
    saved = json.loads((trained_model / "checkpoints" / source / "train_config.json").read_text())
    for i in cases(100):
        folder = tmp_path / f"run{i}" / "checkpoints" / "step-00000001"
        shutil.copytree(source, folder, ignore=lambda _, names: [n for n in names if n.endswith((".bin", ".pkl"))])
        target = rng.choice(["trainer_state.json", "train_config.json"])
        doc = json.loads((folder / target).read_text())
        if rng.random() < 0.1:
            doc = rng.choice(JSON_VALUES)
        else:
            for _ in range(rng.randint(1, 2)):
                doc[rng.choice([*doc, "new_field"])] = rng.choice(JSON_VALUES + [float("inf")])
        (folder / target).write_text(json.dumps(doc))

        def resume():
            state = checkpointing.load_trainer_state(checkpointing.find_checkpoint("latest", folder.parent.parent),
                                                     saved)
            assert isinstance(state.step, int) and isinstance(state.batches_done, int)
        user_error_or_nothing(resume, f"{target}: {doc}")
        shutil.rmtree(tmp_path / f"run{i}")


RANGES = [(0x0, 0x7f), (0x80, 0x2ff), (0x300, 0x36f), (0x2000, 0x206f), (0xe000, 0xf8ff), (0xfe00, 0xfe0f),
          (0xfff0, 0xffff), (0x1f300, 0x1faff), (0xe0000, 0xe007f), (0x10fff0, 0x10ffff), (0x4e00, 0x9fff)]


def test_texts_of_any_code_points_are_scored_or_said_to_have_nothing_to_score(trained_model):
    # Found: a lone surrogate failed its whole batch with polars' UnicodeEncodeError (now a ValueError naming it).
    rng = random.Random(6)
    predictor = Predictor(str(trained_model))
    markup = ["<br />", "<", ">", "&", " ", "\n", "<p", "-->", "<!--", "<script>"]
    for _ in cases(30):
        texts = []
        for _ in range(rng.randint(1, 12)):
            parts = [chr(rng.randint(*rng.choice(RANGES))) * rng.choice([1, 1, 5, 300])
                     for _ in range(rng.randint(0, 30))]
            texts.append("".join(part + (rng.choice(markup) if rng.random() < 0.2 else "") for part in parts))
        answers = predictor.predict(texts)
        assert len(answers) == len(texts)
        for answer in answers:
            assert answer.get("error") or (answer["label"] in predictor.labels and 0 <= answer["score"] <= 1), texts
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate"):
        predictor.predict(["fine", "caf\udce9"])
