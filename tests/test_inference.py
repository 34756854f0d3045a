"""`infer.py`: texts and files in, scored rows and label metrics out."""

import fcntl
import gzip
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import polars as pl
import pytest
from helpers import (ONE_PROCESS, ROOT, gloo_threads_left, hang_up_while_it_runs, recording_its_end,
                     renames_made_durable, run_script, threads_at_exit, two_processes)
from tqdm import tqdm

from sentiment import inference, tables
from sentiment.config import InferArgs, parse_args
from sentiment.demo_data import demo_reviews
from sentiment.errors import SentimentError

TEXTS = ["The acting was superb. I loved it.", "The plot was dreadful. Avoid it."]


def test_infer_prints_json_lines_for_texts(trained_model):
    result = run_script("infer.py", "--model", str(trained_model), *TEXTS[:2])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["text"], r["label"]) for r in lines] == [(TEXTS[0], "positive"), (TEXTS[1], "negative")]
    assert set(lines[0]["scores"]) == {"negative", "positive"}
    # JSON lines are UTF-8 whatever the terminal says: under a Latin-1 one this was a UnicodeEncodeError.
    result = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model), "好 film"],
                            capture_output=True, env={**os.environ, "PYTHONIOENCODING": "latin-1"}, check=True)
    assert json.loads(result.stdout.decode("utf-8"))["text"] == "好 film"


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "jsonl", "json"])
def test_every_format_round_trips_with_other_columns_and_order(tmp_path, trained_model, ext):
    frame = demo_reviews(120, seed=21).with_row_index("id").with_columns(pl.col("id").cast(pl.String))
    source, target = tmp_path / f"in.{ext}", tmp_path / f"out.{ext}"
    write = {"csv": frame.write_csv, "tsv": lambda p: frame.write_csv(p, separator="\t"),
             "parquet": frame.write_parquet, "jsonl": frame.write_ndjson,
             "json": lambda p: p.write_text(json.dumps(frame.to_dicts()))}[ext]
    write(source)
    metrics = tmp_path / "metrics.json"
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(source), "--output", str(target),
                        "--chunk-rows", "50", "--metrics-out", str(metrics))
    read = {"csv": pl.read_csv, "tsv": lambda p: pl.read_csv(p, separator="\t"), "parquet": pl.read_parquet,
            "jsonl": pl.read_ndjson, "json": lambda p: pl.DataFrame(json.loads(p.read_text()))}[ext]  # was JSON lines
    out = read(target)
    assert out["id"].cast(pl.String).to_list() == frame["id"].to_list()
    assert out["review"].to_list() == frame["review"].to_list()
    assert {"label", "score", "score_negative", "score_positive", "error"} <= set(out.columns)
    report = json.loads(metrics.read_text())
    assert report["examples"] == 120
    assert ("120/120" in result.stderr) == (ext != "json")  # the bar has a total: how far, how long to go
    assert report["accuracy"] == pytest.approx((out["label"] == out["sentiment"]).mean())
    assert report["accuracy"] >= 0.9 and "accuracy" in result.stderr


def test_json_lines_keep_nested_fields_and_fields_first_seen_late_in_every_output(tmp_path, trained_model):
    rows = demo_reviews(300, seed=24).to_dicts()
    for i, row in enumerate(rows):
        row["meta"] = {"stars": i % 5, "tags": ["a", "b"][:i % 3]}
    rows[250]["source"] = "late"  # past the 100 lines polars reads for the schema by default: it was dropped
    rows[7]["review"] = '"Wow" he said,\tthen\nhe left. I loved it.'
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for ext in ("csv", "tsv", "parquet", "jsonl"):
        target = tmp_path / f"out.{ext}"
        result = run_script("infer.py", "--model", str(trained_model), "--input", str(source), "--output",
                            str(target), "--chunk-rows", "100")  # CSV failed: "CSV format does not support nested"
        out = tables.read_table(target)  # as this project reads each format
        assert out["source"].to_list() == [None] * 250 + ["late"] + [None] * 49, ext
        meta = out["meta"].to_list()
        if ext in ("csv", "tsv"):  # nested values as JSON text
            meta = [json.loads(m) for m in meta]
        assert meta == [row["meta"] for row in rows], ext
        # TSV has no quoting: tabs and line breaks become spaces, said once; the quotes stay as they were.
        tsv = ext == "tsv"
        assert out["review"][7] == ('"Wow" he said, then he left. I loved it.' if tsv else rows[7]["review"]), ext
        assert out["review"].to_list()[8:] == [row["review"] for row in rows[8:]], ext
        assert ("1 values held tabs or line breaks, which TSV cannot hold" in result.stderr) == tsv, ext


def test_plain_text_from_stdin_and_empty_lines(trained_model):
    result = run_script("infer.py", "--model", str(trained_model), "--input", "-",
                        input="I loved it. The acting was superb.\n\nThe plot was awful. I hated it.\n")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["label"] for r in lines] == ["positive", None, "negative"]
    assert "nothing to score" in lines[1]["error"] and "1 row with nothing to score;" in result.stderr


def test_the_progress_bar_counts_the_rows_that_will_be_read(tmp_path):
    # Files were scored under a bar with no total: no share done, no time left.
    files = {"a.txt": b"one\n\nthree", "b.txt": b"one\r\ntwo\r\n", "c.csv": b'review\n"two\nlines"\n"x, y"\n',
             "d.tsv": b"review\n\"quoted\" text\n\"half\n", "e.jsonl": b'{"review": "a"}\n{"review": "b"}\n'}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        read = sum(len(frame) for frame in inference.read_chunks(str(tmp_path / name), "review", 1))
        assert inference.rows_in(str(tmp_path / name)) == read, name
    assert inference.rows_in("-") is None


def test_a_json_output_is_one_array_whatever_its_texts_hold(tmp_path):
    # Line and paragraph separators (U+2028, U+0085) cut an object in two, and the array with it.
    texts = ["plain", "a\u2028b", "c\x85d", "e\nf", "g\u2029h", ""]
    writer = tables.TableWriter(str(tmp_path / "out.json"))
    writer.write(pl.DataFrame({"review": texts[:3]}))
    writer.write(pl.DataFrame({"review": texts[3:]}))
    writer.close()
    assert json.loads((tmp_path / "out.json").read_text()) == [{"review": text} for text in texts]


def test_texts_typed_at_a_terminal_are_asked_for_and_scored(trained_model):
    # `--input -` with nothing piped in waited without a word.
    terminal, its_end = pty.openpty()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
                                "--input", "-"], stdin=its_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=ROOT, text=True)
    os.close(its_end)
    try:
        os.write(terminal, b"I loved it. The acting was superb.\n\x04")  # a line, then Ctrl-D
        out, err = process.communicate(timeout=120)
    finally:
        os.close(terminal)
    assert "reading texts from the terminal, one a line; end with Ctrl-D" in err
    assert json.loads(out)["label"] == "positive"


def test_lines_piped_in_one_at_a_time_are_answered_as_they_come(trained_model):
    # Answers came only once standard input closed (or 10,000 lines came): `tail -f reviews | infer.py
    # --input -` printed nothing, ever.
    with subprocess.Popen([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model), "--input",
                           "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          cwd=ROOT) as process:
        timer = threading.Timer(120, process.kill)  # a readline that never returns ends the test, not the run
        timer.start()
        try:
            answers = []
            for line in (b"I loved it. The acting was superb.\n", b"The plot was awful. I hated it.\n"):
                process.stdin.write(line)
                process.stdin.flush()
                answers.append(json.loads(process.stdout.readline()))  # its answer, standard input still open
            process.stdin.write(b"A wonderful film.\nDreadful and boring.\r\nA real treat.")  # no end of line
            process.stdin.close()
            answers += [json.loads(line) for line in process.stdout]
            assert process.wait() == 0
        finally:
            timer.cancel()
            process.kill()
    assert [a["text"] for a in answers] == ["I loved it. The acting was superb.", "The plot was awful. I hated it.",
                                            "A wonderful film.", "Dreadful and boring.", "A real treat."]
    assert [a["label"] for a in answers[:2]] == ["positive", "negative"]


@pytest.mark.parametrize("closing, flags, message", [
    ("<&-", ["--input", "-"], "--input -: standard input is closed; pipe the texts in"),
    (">&-", ["I loved it."], "standard output is closed, so the answers cannot be printed; write them to a file"),
])
def test_a_closed_standard_stream_is_one_line(trained_model, closing, flags, message):
    # Each was an AttributeError traceback: Python makes sys.stdin or sys.stdout None when it is closed.
    command = [sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model), *flags]
    result = subprocess.run(["bash", "-c", f'exec "$@" {closing}', "bash", *command], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def unread(pipe):
    """Bytes written to a pipe and not yet read from it."""
    return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("output", [None, "out.jsonl"])
def test_standard_input_left_non_blocking_is_waited_for(tmp_path, trained_model, output):
    # A program that starts infer.py may leave its end of the pipe non-blocking. Finding it empty between
    # two lines, a run printing its answers ended with a BlockingIOError traceback, and a run writing a file
    # took it for the end of the input: it wrote the first line's row, left out the second, and exited 0.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    flags = ["--output", str(tmp_path / output)] if output else []
    with subprocess.Popen([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model), "--input",
                           "-", *flags], stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=ROOT) as process:
        os.close(read_end)
        with os.fdopen(write_end, "wb", buffering=0) as pipe:
            pipe.write(b"I loved it. The acting was superb.\n")
            deadline = time.monotonic() + 300
            while unread(write_end) and time.monotonic() < deadline:  # the model has loaded and reading began
                time.sleep(0.1)
            time.sleep(0.5)  # the next read finds nothing there yet
            pipe.write(b"The plot was awful. I hated it.\n")
        out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    lines = (tmp_path / output).read_text() if output else out.decode()
    assert [json.loads(line)["label"] for line in lines.splitlines()] == ["positive", "negative"]


def test_a_text_file_saved_by_a_windows_editor_scores_as_plain_text(tmp_path, trained_model):
    # Its byte-order mark stayed at the start of the first review, and came back in the output.
    source = tmp_path / "reviews.txt"
    source.write_bytes("\ufeffI loved it. The acting was superb.\r\nThe plot was awful. I hated it.\r\n".encode())
    for args, stdin in ((["--input", str(source)], None), (["--input", "-"], source.read_bytes())):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model), *args],
                                input=stdin, capture_output=True, check=True)
        lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
        assert [r["text"] for r in lines] == ["I loved it. The acting was superb.", "The plot was awful. I hated it."]
        assert [r["label"] for r in lines] == ["positive", "negative"]


@pytest.mark.parametrize("name", ["my reviews.csv", "my reviews.tsv", "my reviews.jsonl", "my reviews.txt"])
def test_lines_ended_by_a_carriage_return_alone_are_refused_with_a_command_that_converts_them(tmp_path, trained_model,
                                                                                              name):
    # A CSV or TSV of classic Mac OS line ends was read as a header of every line and no rows: nothing scored,
    # nothing said, exit status 0. JSON lines were an InternalError; a text file, one review of every line.
    path = tmp_path / name
    texts = demo_reviews(5, seed=31)["review"].to_list()
    if path.suffix == ".txt":
        path.write_text("\r".join(texts) + "\r")
    else:
        frame = pl.DataFrame({"review": texts})
        {".csv": frame.write_csv, ".tsv": lambda p: frame.write_csv(p, separator="\t", quote_style="never"),
         ".jsonl": frame.write_ndjson}[path.suffix](path)
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r"))
    refused = run_script("infer.py", "--model", str(trained_model), "--input", str(path), check=False)
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert f"{path}: its lines end in a carriage return alone" in refused.stderr
    subprocess.run(refused.stderr.strip().split("convert them first: ")[1], shell=True, check=True)  # as told
    converted = run_script("infer.py", "--model", str(trained_model), "--input",
                           str(tmp_path / path.name.replace(".", "-lf.")))
    assert [json.loads(line)["text"] for line in converted.stdout.splitlines()] == texts


def test_a_csv_that_names_its_separator_as_excel_writes_it_is_scored_whole(tmp_path, trained_model):
    # Its first line, "sep=,", was read as the header: "no column 'review'; it has 'sep=', ''".
    path = tmp_path / "reviews.csv"
    texts = demo_reviews(5, seed=32)["review"].to_list()
    pl.DataFrame({"review": texts}).write_csv(path)
    path.write_text("sep=,\n" + path.read_text())
    scored = run_script("infer.py", "--model", str(trained_model), "--input", str(path))
    assert [json.loads(line)["text"] for line in scored.stdout.splitlines()] == texts


def test_a_reader_that_stops_early_ends_the_run_quietly(tmp_path, trained_model):
    # `infer.py … | head -1` ended in a BrokenPipeError traceback.
    (tmp_path / "lines.txt").write_text("\n".join(demo_reviews(3000, seed=5)["review"].to_list()) + "\n")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
                                "--input", str(tmp_path / "lines.txt"), "--chunk-rows", "100"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(process.stdout.readline())["label"] in ("negative", "positive")
    process.stdout.close()  # the reader has what it wanted
    with process.stderr:
        stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE, stderr[-2000:]
    assert "Traceback" not in stderr and "Broken pipe" not in stderr


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
    # Inputs and outputs that cannot work are named before the model loads (a missing model would be named first).
    (["--model", "nowhere", "--input", "missing.csv"], "missing.csv: no such file"),
    (["--model", "nowhere", "--input", "reviews.csv.gz"],  # was "unknown file type .gz"
     "reviews.csv.gz: a compressed file; unpack it first (gunzip -k reviews.csv.gz) and name reviews.csv"),
    (["--model", "nowhere", "--input", "{data}", "--output", "out.xlsx"], "out.xlsx: unknown file type"),
    (["--model", "nowhere", "--input", "{data}", "--output", "/dev/stdout"],
     "without --output, the rows go to standard output as JSON lines"),
    (["--model", "nowhere", "--input", "{data}", "--text-column", "body"], "no column 'body'"),
    (["--model", "nowhere", "--input", "{data}", "--label-column", "stars"], "no label column 'stars'"),
    # Neither was "give texts to score as arguments, or --input FILE, but not both", as both was.
    ([], "nothing to score: give texts as arguments, --input FILE, or --input - to read them from standard input"),
    (["--input", "{data}", "hello"], "texts as arguments and --input "),
    (["--max-length", "1024", "hello"], "--max-length: 1024 tokens is over this model's limit of 512 positions"),
    (["--max-length", "1", "hello"], "--max-length: must be at least 8 tokens, got 1"),  # kept all but one token
    (["--threads", "-1", "hello"], "--threads must be at least 1, got -1"),  # a traceback from PyTorch
    (["--input", "{data}", "--text-column", "sentiment", "--label-column", "sentiment"],
     "--text-column and --label-column are both 'sentiment'"),  # scored the labels against themselves
    # --metrics-out that could not be written was left unwritten without a word, exit status 0.
    (["--metrics-out", "m.json", "hello"], "--metrics-out needs true labels, from a label column of an --input"),
    (["--input", "{text}", "--metrics-out", "m.json"], "--metrics-out needs true labels, and "),
    (["--model", "nowhere", "--input", "{data}", "--text-column", "sentiment", "--metrics-out", "m.json"],
     "--metrics-out needs true labels, and "),  # the labels' column is the text: no other one to compare with
    (["--device", "nonsense", "hello"], "--device: 'nonsense' is not a device"),  # a traceback from PyTorch
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, trained_model, reviews_csv, flags, message):
    (tmp_path / "texts.txt").write_text("good film\n")
    (tmp_path / "reviews.csv.gz").write_bytes(b"")
    flags = [f.format(data=reviews_csv, text=tmp_path / "texts.txt") for f in flags]
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
    run_script(*two_processes(), "infer.py", *common, "--output", str(tmp_path / "two.csv"))
    one, two = pl.read_csv(tmp_path / "one.csv"), pl.read_csv(tmp_path / "two.csv")
    assert len(two) == 333
    assert one["review"].to_list() == two["review"].to_list()
    assert one["label"].to_list() == two["label"].to_list()
    np.testing.assert_allclose(one["score"].to_numpy(), two["score"].to_numpy(), atol=1e-6)


# infer.py, but in process 0 alone, the one that writes, the disk is full as the output is written.
FULL_IN_PROCESS_0 = """
import errno, os, runpy, sys
sys.argv = sys.argv[1:]
if os.environ["RANK"] == "0":
    from sentiment import tables
    def write(self, frame):
        raise OSError(errno.ENOSPC, "No space left on device")
    tables.TableWriter.write = write
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_when_the_writing_process_stops_on_an_error_the_other_says_so_in_a_line(tmp_path, trained_model):
    # Process 1, waiting for process 0 to gather the next chunk's scores, ended in a gloo traceback
    # ("Connection closed by peer") longer than process 0's one-line error.
    demo_reviews(300, seed=24).write_csv(tmp_path / "in.csv")
    wrapper = tmp_path / "full_in_0.py"
    wrapper.write_text(FULL_IN_PROCESS_0)
    result = run_script(*two_processes(), str(wrapper), os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
                        "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv"),
                        "--chunk-rows", "50", check=False)
    assert result.returncode != 0
    assert result.stderr.count("error: the disk of") == 1, result.stderr[-3000:]
    assert "error: process 1: another process of this run ended" in result.stderr, result.stderr[-3000:]
    assert "[rank1]: Traceback" not in result.stderr and not (tmp_path / "out.csv").exists()


def test_two_runs_writing_one_output_at_once_leave_one_of_them_whole(tmp_path, trained_model):
    # Each run writes under a temporary name of its own and renames it into place: the output is the
    # one or the other, never rows of both, and neither run takes the other's temporary for a stale one.
    inputs = {1500: tmp_path / "a.csv", 2000: tmp_path / "b.csv"}  # a second or more of writing each
    for rows, path in inputs.items():
        demo_reviews(rows, seed=rows).write_csv(path)
    runs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
                              "--input", str(path), "--output", str(tmp_path / "scored.csv"), "--chunk-rows", "250"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for path in inputs.values()]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    scored = pl.read_csv(tmp_path / "scored.csv")
    assert scored["review"].to_list() in [pl.read_csv(path)["review"].to_list() for path in inputs.values()]
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "b.csv", "scored.csv"]


def test_output_onto_the_input_is_refused_and_the_input_is_kept(tmp_path, trained_model, reviews_csv):
    before = reviews_csv.read_bytes()
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(reviews_csv),
                        "--output", str(reviews_csv), check=False)
    assert result.returncode == 2 and "is the input file" in result.stderr
    assert reviews_csv.read_bytes() == before


def test_outputs_onto_the_model_folder_or_onto_each_other_are_refused(tmp_path, trained_model, reviews_csv):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for flags in (["--metrics-out", str(model / "config.json")], ["--output", str(model / "tokenizer.json")]):
        result = run_script("infer.py", "--model", str(model), "--input", str(reviews_csv), *flags, check=False)
        assert result.returncode == 2 and "would overwrite a file of the model folder" in result.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    both = str(tmp_path / "scored.json")
    result = run_script("infer.py", "--model", str(model), "--input", str(reviews_csv), "--output", both,
                        "--metrics-out", both, check=False)
    assert result.returncode == 2 and "--output and --metrics-out are both" in result.stderr
    run_script("infer.py", "--model", str(model), "--input", str(reviews_csv), "--output", both,
               "--metrics-out", str(model / "test_metrics.json"))  # a new file beside the model is fine
    assert json.loads((model / "test_metrics.json").read_text())["examples"] == len(pl.read_csv(reviews_csv))


@pytest.mark.parametrize("error", [OSError("No space left on device (os error 28)"),  # polars: no errno
                                   pl.exceptions.ComputeError("parquet: underlying IO error: No space left on "
                                                              "device (os error 28)")])
def test_a_full_disk_is_one_line_and_leaves_the_old_output(tmp_path, trained_model, reviews_csv, monkeypatch, error):
    (tmp_path / "scored.csv").write_text("old\n")

    def full(self, frame):
        raise error

    monkeypatch.setattr(tables.TableWriter, "write", full)
    with pytest.raises(SentimentError, match=r"the disk of .* is full .*free some space"):
        inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(reviews_csv),
                                                 "--output", str(tmp_path / "scored.csv")]))
    assert sorted(os.listdir(tmp_path)) == ["reviews.csv", "scored.csv"]  # no temporary file left
    assert (tmp_path / "scored.csv").read_text() == "old\n"


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_a_signal_as_the_output_is_opened_leaves_no_temporary_file(tmp_path, trained_model, reviews_csv,
                                                                   monkeypatch, ext):
    # The writer made its temporary file before the block whose `finally` removes it: a SIGTERM
    # landing in between left the file.
    (tmp_path / f"scored.{ext}").write_text("old\n")
    opened = tables.TableWriter.__init__

    def signalled_as_it_opens(self, path):
        opened(self, path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tables.TableWriter, "__init__", signalled_as_it_opens)
    bars = set(tqdm._instances)
    with pytest.raises(SystemExit) as stopped:
        inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(reviews_csv),
                                                 "--output", str(tmp_path / f"scored.{ext}")]))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert set(tqdm._instances) <= bars  # a progress bar left open was drawn as the process ended, after its stop
    assert sorted(os.listdir(tmp_path)) == ["reviews.csv", f"scored.{ext}"]
    assert (tmp_path / f"scored.{ext}").read_text() == "old\n"


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_outputs_are_on_disk_before_they_replace_the_old_ones(tmp_path, trained_model, reviews_csv, monkeypatch, ext):
    target, metrics = tmp_path / f"scored.{ext}", tmp_path / "metrics.json"
    target.write_text("old results\n")
    metrics.write_text("{}")
    durable = renames_made_durable(monkeypatch)
    inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(reviews_csv),
                                             "--output", str(target), "--metrics-out", str(metrics)]))
    assert durable == {os.path.realpath(target): True, os.path.realpath(metrics): True}
    assert len(pl.read_csv(target) if ext == "csv" else pl.read_parquet(target)) == len(pl.read_csv(reviews_csv))


def test_outputs_that_are_links_are_written_through(tmp_path, trained_model, reviews_csv):
    # The file was renamed onto the link: `latest.csv -> runs/scored.csv` became a file of its own,
    # and the file it pointed to kept the old results.
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("scored.csv", "metrics.json"):
        (runs / name).write_text("old\n")
        (tmp_path / f"latest-{name}").symlink_to(runs / name)
    inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(reviews_csv),
                                             "--output", str(tmp_path / "latest-scored.csv"),
                                             "--metrics-out", str(tmp_path / "latest-metrics.json")]))
    assert (tmp_path / "latest-scored.csv").is_symlink() and (tmp_path / "latest-metrics.json").is_symlink()
    assert len(pl.read_csv(runs / "scored.csv")) == len(pl.read_csv(reviews_csv))
    assert json.loads((runs / "metrics.json").read_text())["examples"] == len(pl.read_csv(reviews_csv))
    assert sorted(os.listdir(runs)) == ["metrics.json", "scored.csv"]


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_a_private_output_stays_private(tmp_path, trained_model, reviews_csv, ext):
    # The new file, made under the umask, replaced one only its owner could read: a rerun made the
    # results readable by everyone on the machine.
    target, metrics = tmp_path / f"scored.{ext}", tmp_path / "metrics.json"
    for path in (target, metrics):
        path.write_text("old\n")
        path.chmod(0o600)
    inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(reviews_csv),
                                             "--output", str(target), "--metrics-out", str(metrics)]))
    assert json.loads(metrics.read_text())["examples"] == len(pl.read_csv(reviews_csv))
    assert {path.stat().st_mode & 0o777 for path in (target, metrics)} == {0o600}


def test_a_failed_run_leaves_an_existing_output_as_it_was(tmp_path, trained_model):
    lines = [json.dumps({"review": f"The acting was superb. I loved it. {i}"}) for i in range(60)]
    lines[45] = '{"review": "cut short'
    source, target = tmp_path / "in.jsonl", tmp_path / "out.csv"
    source.write_text("\n".join(lines) + "\n")
    target.write_text("earlier results\n")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(source), "--output", str(target),
                        "--chunk-rows", "10", check=False)
    assert result.returncode == 2 and "line 46 is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert target.read_text() == "earlier results\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.csv"]  # no temporary file left behind


def writing(folder):
    """Whether an infer.py run has begun to write its output in `folder`: its hidden temporary file is there."""
    return any(".tmp-" in p.name for p in folder.iterdir())


def wait_until_writing(folder, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not writing(folder):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def stopped_while_scoring(tmp_path, model, stop, launcher=(), env=None):
    """Score a large file onto an existing output (`python [launcher] infer.py`, in a session of its
    own), `stop(process)` once its temporary output exists, and return (exit status, stderr) after
    checking the old output is as it was and no temporary file is left."""
    demo_reviews(20000, seed=3).write_csv(tmp_path / "big.csv")
    (tmp_path / "scored.csv").write_text("old\n")
    process = subprocess.Popen([sys.executable, *launcher, "infer.py", "--model", str(model),
                                "--input", str(tmp_path / "big.csv"), "--output", str(tmp_path / "scored.csv"),
                                "--chunk-rows", "100"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, **(env or {})})
    wait_until_writing(tmp_path, process)
    stop(process)
    _, stderr = process.communicate(timeout=120)  # the pipes close when infer.py, which holds them, has ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.csv", "scored.csv"], stderr[-2000:]
    assert (tmp_path / "scored.csv").read_text() == "old\n"
    return process.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_stopped_by_a_signal_keeps_the_old_output_and_leaves_no_temporary_file(tmp_path, trained_model,
                                                                                     signum, status):
    # SIGTERM's default action ended the process on the spot, leaving the half-written output beside it.
    returncode, stderr = stopped_while_scoring(tmp_path, trained_model, lambda p: p.send_signal(signum))
    assert returncode == status, stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name}; {tmp_path / 'scored.csv'} is as it was" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_two_process_run_stopped_by_a_signal_keeps_the_old_output_and_says_so_once(tmp_path, trained_model):
    # As Slurm or systemd stop a job: every process is sent SIGTERM.
    (tmp_path / "run").mkdir()
    _, stderr = stopped_while_scoring(tmp_path / "run", trained_model, lambda p: os.killpg(p.pid, signal.SIGTERM),
                                      two_processes(), env=threads_at_exit(tmp_path / "threads"))
    assert stderr.count("stopped by SIGTERM") == 1, stderr[-2000:]  # was said by each process
    # Each process used to shut its interpreter down with the group's gloo threads still running, which can
    # abort it (SIGABRT in place of exit status 143); the launcher's own record shows the recording worked.
    assert gloo_threads_left(tmp_path / "threads", "infer.py") == []
    assert gloo_threads_left(tmp_path / "threads", "launch.py") == [[]]


@pytest.mark.slow
def test_sigterm_to_a_one_process_accelerate_launch_stops_the_run(tmp_path, trained_model):
    # The launcher died without passing SIGTERM on; the run went on and replaced the output.
    _, stderr = stopped_while_scoring(tmp_path, trained_model, lambda p: p.terminate(), ONE_PROCESS)
    assert f"stopped by SIGTERM; {tmp_path / 'scored.csv'} is as it was" in stderr, stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ONE_PROCESS], ids=["python", "accelerate launch"])
def test_a_terminal_that_closes_stops_the_run_and_keeps_the_old_output(tmp_path, trained_model, launcher):
    # A closed terminal's SIGHUP ended the run on the spot, leaving its half-written output beside the old one.
    demo_reviews(20000, seed=3).write_csv(tmp_path / "big.csv")
    (tmp_path / "scored.csv").write_text("old\n")
    files = tmp_path / "files"
    files.mkdir()
    status = hang_up_while_it_runs(files, launcher, "infer.py", "--model", str(trained_model), "--input",
                                   str(tmp_path / "big.csv"), "--output", str(tmp_path / "scored.csv"),
                                   "--chunk-rows", "100", started=lambda: writing(tmp_path))
    # Under the launcher, its death (SIGTERM) may come before the hang-up.
    assert status in ((str(128 + signal.SIGHUP), str(128 + signal.SIGTERM)) if launcher
                      else (str(128 + signal.SIGHUP),))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.csv", "files", "scored.csv"]
    assert (tmp_path / "scored.csv").read_text() == "old\n"


def test_a_stop_whose_interrupt_native_code_turned_into_another_error_still_stops_the_run(capsys):
    # A hang-up that came while polars' Rust code called back into Python: it swallowed the KeyboardInterrupt
    # and raised "TypeError: '<unprintable str object>' is not a Polars data type", a traceback and exit 1.
    with pytest.raises(SystemExit) as stop:
        with inference.stopped_by_signals("scored.csv"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except BaseException:  # as pyo3 does with an exception raised while it formats an object
                raise TypeError("'<unprintable str object>' is not a Polars data type") from None
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "stopped by SIGTERM; scored.csv is as it was\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers put back
    with pytest.raises(TypeError):  # not asked to stop: an error is an error
        with inference.stopped_by_signals("scored.csv"):
            raise TypeError("a real one")


def test_a_run_whose_progress_reader_goes_away_scores_on_into_its_output(tmp_path, trained_model):
    # `infer.py --output FILE 2>&1 | tee log`, tee ended (by Ctrl-C or a closed terminal before the run's own
    # stop, or on its own): the progress bar's next write failed (EPIPE) and ended the run, its output unwritten.
    demo_reviews(3000, seed=3).write_csv(tmp_path / "big.csv")
    command, its_end = recording_its_end(tmp_path, "infer.py")
    flags = ["--model", str(trained_model), "--input", str(tmp_path / "big.csv"), "--output",
             str(tmp_path / "scored.csv"), "--chunk-rows", "100"]
    tee = subprocess.Popen(["tee", str(tmp_path / "log")], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    process = subprocess.Popen([sys.executable, *command, *flags], cwd=ROOT, stdout=tee.stdin, stderr=tee.stdin,
                               env={**os.environ, "TQDM_MININTERVAL": "0"})  # the bar drawn at every chunk
    tee.stdin.close()
    wait_until_writing(tmp_path, process)
    tee.kill()
    tee.wait()
    assert process.wait(timeout=120) == 0 and its_end() == "0"
    assert len(pl.read_csv(tmp_path / "scored.csv")) == 3000


def test_under_nohup_a_hang_up_does_not_stop_the_run(tmp_path, trained_model):
    demo_reviews(3000, seed=3).write_csv(tmp_path / "big.csv")
    process = subprocess.Popen([sys.executable, "infer.py", "--model", str(trained_model), "--input",
                                str(tmp_path / "big.csv"), "--output", str(tmp_path / "scored.csv"), "--chunk-rows",
                                "100"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup
    wait_until_writing(tmp_path, process)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert len(pl.read_csv(tmp_path / "scored.csv")) == 3000


@pytest.mark.slow
@pytest.mark.parametrize("output", ["scored.csv", "scored.parquet"])
def test_what_a_killed_run_left_is_removed_by_the_next_and_a_live_run_s_is_kept(tmp_path, trained_model, output):
    # SIGKILL (the out-of-memory killer) leaves the hidden temporary output, as large as the part
    # scored; nothing removed it, so every killed run left one more.
    demo_reviews(20000, seed=3).write_csv(tmp_path / "big.csv")
    command = [sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
               "--input", str(tmp_path / "big.csv"), "--output", str(tmp_path / output), "--chunk-rows", "100"]
    killed = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_writing(tmp_path, killed, seconds=60)
    killed.kill()
    killed.wait()
    assert writing(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        another_run = tmp_path / f".{output}.tmp-{socket.gethostname()}-{live.pid}"
        another_run.write_text("a run still writing")  # a process that is alive: its file is not touched
        run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "big.csv"),
                   "--output", str(tmp_path / output), "--chunk-rows", "5000")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.csv", output, another_run.name])
    finally:
        live.kill()
        live.wait()
    assert len(tables.scanner(str(tmp_path / output)).collect()) == 20000


@pytest.mark.parametrize("where, message", [
    ("missing/out.csv", "does not exist; create it first"),
    (".", "is a folder; name a file in it"),
    ("dangling.csv", "does not exist; create it first"),  # a link to a file in a folder that is not there
    ("pipe.csv", "a named pipe or device, not a file"),  # was replaced by a file, its reader left waiting
])
@pytest.mark.parametrize("flag", ["--output", "--metrics-out"])
def test_outputs_that_cannot_be_written_are_one_line(tmp_path, trained_model, reviews_csv, flag, where, message):
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "gone" / "out.csv")
    os.mkfifo(tmp_path / "pipe.csv")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(reviews_csv),
                        flag, str(tmp_path / where), check=False, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_read_only_output_is_refused_and_kept(tmp_path, trained_model, reviews_csv, monkeypatch):
    # The rename replaced a file made read-only to keep it, where the shell's `>` refuses it. (The tests
    # run as root, who may write anything, so the check's answer is what is faked.)
    kept = tmp_path / "kept.csv"
    kept.write_text("results worth keeping\n")
    kept.chmod(0o444)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (str(path) == str(kept) and mode & os.W_OK)
                        and real_access(path, mode))
    with pytest.raises(SentimentError, match=r"--output .*kept\.csv is read-only, as if kept from being overwritten; "
                                             r"make it writable \(chmod u\+w\)"):
        inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(reviews_csv),
                                                 "--output", str(kept)]))
    assert kept.read_text() == "results worth keeping\n" and sorted(os.listdir(tmp_path)) == ["kept.csv", "reviews.csv"]


def test_text_that_is_not_utf8_is_one_line(tmp_path, trained_model):
    piped = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
                            "--input", "-"], input=b"good film\ncaf\xe9 au lait\n", capture_output=True, cwd=ROOT)
    assert piped.returncode == 2 and b"standard input: line 2 is not valid UTF-8" in piped.stderr
    argv = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(trained_model),
                           b"caf\xe9"], capture_output=True, cwd=ROOT)
    assert argv.returncode == 2 and b"text 1 on the command line is not valid UTF-8" in argv.stderr
    (tmp_path / "latin1.csv").write_bytes(b"review\ngood film\ncaf\xe9 au lait\n")
    table = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "latin1.csv"), check=False)
    assert table.returncode == 2 and "line 3 is not valid UTF-8; convert the file" in table.stderr
    (tmp_path / "folder.txt").mkdir()
    folder = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "folder.txt"),
                        check=False)
    assert folder.returncode == 2 and "a folder, not a file" in folder.stderr
    (tmp_path / "packed.txt").write_bytes(gzip.compress(b"good film\ndull film\n"))  # was "line 1 is not valid UTF-8"
    packed = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "packed.txt"), check=False)
    assert packed.returncode == 2
    assert "packed.txt: its bytes are gzip-compressed, though it is named .txt" in packed.stderr


def test_a_text_column_of_lists_or_numbers_is_one_line(tmp_path, trained_model):
    for name, values in (("lists", [[1, 2], [3]]), ("numbers", [1, 2])):
        pl.DataFrame({"review": values}).write_parquet(tmp_path / f"{name}.parquet")
        result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / f"{name}.parquet"),
                            check=False)
        assert result.returncode == 2 and "column 'review' holds" in result.stderr and "not text" in result.stderr
        assert "Traceback" not in result.stderr


def test_columns_an_output_format_cannot_hold_are_refused_before_the_model_loads(tmp_path, trained_model, capsys,
                                                                                 monkeypatch):
    # A Parquet input's bytes or durations: polars failed at the first chunk written, with a traceback into
    # CSV and a Rust panic into JSON lines (bytes inside a list, too); a 'sentiment' column of lists failed
    # the accuracy with a cast error.
    import datetime
    frame = pl.DataFrame({"review": ["I loved it.", "Awful."], "thumb": [b"\x89PNG", None],
                          "pages": [[b"a"], []], "watched": [datetime.timedelta(minutes=90)] * 2,
                          "sentiment": [["positive"], ["negative"]]})
    frame.write_parquet(tmp_path / "in.parquet")
    monkeypatch.setattr(inference, "Predictor", None)  # every refusal comes before the model loads

    def score(output, *flags):
        inference.run(parse_args(InferArgs, "", ["--model", str(trained_model), "--input", str(tmp_path / "in.parquet"),
                                                 "--output", str(tmp_path / output), *flags]))
    for output, column, what, instead in (("out.csv", "thumb", "bytes (Binary)", ".parquet"),
                                          ("out.jsonl", "thumb", "bytes (Binary)", ".parquet"),
                                          ("out.tsv", "watched", "durations (Duration(time_unit='us'))",
                                           ".parquet or .jsonl")):
        kept = frame if output != "out.tsv" else frame.drop("thumb", "pages")
        kept.write_parquet(tmp_path / "in.parquet")
        with pytest.raises(SentimentError, match=re.escape(
                f"--output {tmp_path / output}: the input's column {column!r} holds {what}, which "
                f"{output[4:].upper()} cannot hold; write {instead}, or leave the column out of the input")):
            score(output)
    frame.drop("thumb").write_parquet(tmp_path / "in.parquet")
    with pytest.raises(SentimentError, match="column 'pages' holds bytes"):  # inside a list
        score("out.json")
    with pytest.raises(SentimentError, match=re.escape("column 'sentiment' holds List(String) values, not labels")):
        score("out.parquet", "--label-column", "sentiment")
    monkeypatch.undo()
    frame.write_parquet(tmp_path / "in.parquet")
    score("out.parquet")  # Parquet holds every column, and a 'sentiment' of lists is no label column
    scored = pl.read_parquet(tmp_path / "out.parquet")
    assert scored.drop("label", "score", "score_negative", "score_positive", "error").equals(frame)
    assert "accuracy" not in capsys.readouterr().err


def test_a_header_only_table_gives_a_header_only_output(tmp_path, trained_model):
    (tmp_path / "in.csv").write_text("id,review\n")
    for output in ("out.csv", "out.json"):
        run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "in.csv"),
                   "--output", str(tmp_path / output))
    header = (tmp_path / "out.csv").read_text().strip().split(",")
    assert header == ["id", "review", "label", "score", "score_negative", "score_positive", "error"]
    assert json.loads((tmp_path / "out.json").read_text()) == []


def test_rows_left_out_of_the_accuracy_are_counted_and_numeric_labels_do_not_crash(tmp_path, trained_model):
    frame = demo_reviews(40, seed=26)
    labels = frame["sentiment"].to_list()
    labels[:5] = [None] * 5
    labels[5:10] = ["Positive"] * 5
    labels[10:12] = [f" {labels[10]}", f"{labels[11]}\t"]  # spaces around a label: dropped, as in training
    frame.with_columns(pl.Series("sentiment", labels)).write_csv(tmp_path / "in.csv")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "in.csv"),
                        "--output", str(tmp_path / "out.csv"), "--metrics-out", str(tmp_path / "m.json"))
    assert "5 rows without a label in 'sentiment'" in result.stderr
    assert "5 rows with labels the model does not know ('Positive' (5))" in result.stderr
    assert "differ from them only in case" in result.stderr
    assert json.loads((tmp_path / "m.json").read_text())["examples"] == 30
    numeric = frame.with_columns(pl.Series("stars", list(range(40))))
    numeric.write_parquet(tmp_path / "n.parquet")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "n.parquet"),
                        "--label-column", "stars", "--output", str(tmp_path / "n.csv"), "--metrics-out",
                        str(tmp_path / "n.json"), check=False)
    assert "40 rows with labels the model does not know" in result.stderr
    assert len(pl.read_csv(tmp_path / "n.csv")) == 40
    assert result.returncode == 2 and "n.json not written: no row has a label the model knows" in result.stderr
    assert not (tmp_path / "n.json").exists()


def test_an_input_column_named_as_a_score_is_kept_and_the_accuracy_is_against_it(tmp_path, trained_model):
    # True labels in a column named "label" were overwritten with the predictions, in the output and
    # in the accuracy: half the labels wrong on purpose still scored 1.0000.
    frame = demo_reviews(60, seed=28).rename({"sentiment": "label"})
    flipped = ["positive" if i < 20 else label for i, label in enumerate(frame["label"].to_list())]
    frame = frame.with_columns(pl.Series("label", flipped), pl.lit("kept").alias("error"))
    frame.write_csv(tmp_path / "in.csv")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "in.csv"),
                        "--label-column", "label", "--output", str(tmp_path / "out.csv"),
                        "--metrics-out", str(tmp_path / "m.json"))
    assert "has a column named 'label': the scores go in predicted_label" in result.stderr
    out = pl.read_csv(tmp_path / "out.csv")
    assert out["label"].to_list() == flipped and out["error"].to_list() == ["kept"] * 60
    assert {"predicted_label", "predicted_score", "predicted_score_positive", "predicted_error"} <= set(out.columns)
    accuracy = json.loads((tmp_path / "m.json").read_text())["accuracy"]
    assert accuracy == pytest.approx((out["predicted_label"] == out["label"]).mean()) and accuracy < 0.9


# How a classifier's scores are made follows its config, as in transformers' pipeline: a softmax over
# labels that exclude each other, a sigmoid for each of labels that do not (or for a single logit), the
# raw output for a regression. Before, every folder got a softmax: a single logit scored 1.0, always.
@pytest.mark.parametrize("kind", ["two labels", "multi-label", "one logit", "regression"])
def test_a_folder_without_our_settings_scores_as_the_pipeline_does(tmp_path, trained_model, kind):
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, pipeline

    from sentiment.predictor import Predictor
    folder = tmp_path / "plain"
    shutil.copytree(trained_model, folder)
    (folder / "sentiment.json").unlink()
    if kind == "multi-label":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    if kind in ("one logit", "regression"):
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, id2label={0: "rating"}, label2id={"rating": 0}, ignore_mismatched_sizes=True,
            problem_type="regression" if kind == "regression" else None).save_pretrained(folder)
    texts = [t.replace(". ", ". <br /><br />", 2) for t in demo_reviews(80, seed=27)["review"].to_list()]
    theirs = pipeline("text-classification", model=str(folder), top_k=None)(texts, truncation=True)
    ours = Predictor(str(folder), precision="fp32").predict(texts)
    for mine, their in zip(ours, theirs):
        assert mine["label"] == their[0]["label"]  # the pipeline ranks the labels, best first
        for answer in their:
            assert mine["scores"][answer["label"]] == pytest.approx(answer["score"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_score_standard_input_once(trained_model, tmp_path):
    lines = "".join(f"The acting was superb. I loved it. {i}\n" for i in range(40))
    result = run_script(*two_processes(), "infer.py", "--model", str(trained_model), "--input", "-", input=lines,
                        env=threads_at_exit(tmp_path), timeout=300)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["text"] for a in answers] == lines.splitlines()
    # The process group is gone before the interpreter shuts down: a gloo thread still running then can
    # abort a run whose work is done (SIGABRT, and the launcher reports it failed).
    assert gloo_threads_left(tmp_path, "infer.py") == [[], []]
    texts = run_script(*two_processes(), "infer.py", "--model", str(trained_model), "one review", "another",
                       timeout=300)
    assert len(texts.stdout.splitlines()) == 2  # printed once, not once per process


@pytest.mark.slow
def test_bad_input_every_process_meets_is_said_once_and_whole(trained_model, tmp_path):
    # Each process of the launch said it: "error: …csverror: …csv", the two lines run into one where
    # the processes' output is unbuffered, as PYTHONUNBUFFERED (which many images set) makes it.
    result = run_script(*two_processes(), "infer.py", "--model", str(trained_model), "--input",
                        str(tmp_path / "missing.csv"), env={"PYTHONUNBUFFERED": "1"}, check=False, timeout=300)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "error:" in line]
    assert said == [f"error: {tmp_path / 'missing.csv'}: no such file"], result.stderr[-2000:]


def test_the_confusion_matrix_of_many_classes_goes_to_the_metrics_file_not_the_terminal(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from sentiment.modeling import ModelSettings, save_model_folder, tiny_config, train_tiny_tokenizer
    labels = [f"genre {i:02d}" for i in range(40)]
    texts = [f"a film of genre {i % 40}, number {i}" for i in range(400)]
    tokenizer = train_tiny_tokenizer(texts)
    model = AutoModelForSequenceClassification.from_config(tiny_config(len(tokenizer), labels))
    save_model_folder(str(tmp_path / "model"), model, tokenizer, ModelSettings(labels=labels, max_length=32))
    pl.DataFrame({"review": texts, "sentiment": [labels[i % 40] for i in range(400)]}).write_csv(tmp_path / "in.csv")
    result = run_script("infer.py", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.csv"),
                        "--output", str(tmp_path / "out.csv"), "--metrics-out", str(tmp_path / "m.json"))
    line = next(line for line in result.stderr.splitlines() if line.startswith("accuracy"))
    assert "the confusion matrix is written by --metrics-out" in line and len(line) < 200  # was 1,600 counts
    matrix = json.loads((tmp_path / "m.json").read_text())["confusion_matrix"]["rows_true_columns_predicted"]
    assert len(matrix) == 40 and sum(map(sum, matrix)) == 400


def test_a_category_column_with_tabs_is_written_to_tsv_as_text_with_spaces(tmp_path, trained_model):
    frame = pl.DataFrame({"review": ["I loved it.\tThe acting was superb.", "The plot was dreadful.\nAvoid it."]})
    frame.with_columns(pl.col("review").cast(pl.Categorical)).write_parquet(tmp_path / "in.parquet")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "in.parquet"),
                        "--output", str(tmp_path / "out.tsv"))
    out = tables.read_table(tmp_path / "out.tsv")  # a tab or line break kept in a category split its row
    assert out["review"].to_list() == ["I loved it. The acting was superb.", "The plot was dreadful. Avoid it."]
    assert out["label"].to_list() == ["positive", "negative"]
    assert "2 values held tabs or line breaks" in result.stderr


def test_column_names_with_tabs_or_line_breaks_are_written_to_tsv_with_spaces(tmp_path, trained_model):
    # The header was written as it was: a name with a line break split it over two lines, one with a tab
    # made two columns of one, and every row was read back under the wrong names.
    frame = pl.DataFrame({"review": ["I loved it.", "The plot was dreadful."], "stars\tof 10": ["9", "2"],
                          "note\r\nby hand": ["yes", "no"]})
    frame.write_parquet(tmp_path / "in.parquet")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "in.parquet"),
                        "--output", str(tmp_path / "out.tsv"), "--chunk-rows", "1")
    out = tables.read_table(tmp_path / "out.tsv")
    assert out.columns[:3] == ["review", "stars of 10", "note  by hand"]
    assert out["stars of 10"].to_list() == ["9", "2"] and out["label"].to_list() == ["positive", "negative"]
    assert "2 column names held tabs or line breaks" in result.stderr and "values" not in result.stderr
    frame.with_columns(pl.col("review").alias("stars of 10")).write_parquet(tmp_path / "clash.parquet")
    result = run_script("infer.py", "--model", str(trained_model), "--input", str(tmp_path / "clash.parquet"),
                        "--output", str(tmp_path / "clash.tsv"), check=False)
    assert result.returncode == 2 and not os.path.exists(tmp_path / "clash.tsv")
    assert "columns 'stars\\tof 10' and 'stars of 10' would have one name in TSV" in result.stderr
