import bz2
import codecs
import gzip
import json
import lzma
import os
import shutil

import numpy as np
import polars as pl
import pytest
from tqdm import tqdm

from sentiment import data as data_module
from sentiment import tables
from sentiment.config import TrainArgs
from sentiment.data import clean_texts, load_labelled, load_splits, stratified_order
from sentiment.demo_data import demo_reviews
from sentiment.errors import SentimentError


def splits_of(path, **kwargs):
    return load_splits(TrainArgs(data=str(path), **kwargs))


def test_clean_texts_strips_html_and_folds_whitespace():
    assert clean_texts(["Great<br /><br />film.\n\n It  was <i>fun</i>", None]) == ["Great film. It was fun", None]


def test_stratified_order_keeps_class_proportions_in_every_prefix():
    labels = np.array(["a"] * 300 + ["b"] * 100)
    order = stratified_order(labels, seed=0)
    assert sorted(order) == list(range(400))
    for n in (40, 100, 200):
        assert abs((labels[order[:n]] == "b").mean() - 0.25) <= 1.5 / n + 0.02


def test_splits_are_stratified_disjoint_and_deduplicated(tmp_path):
    frame = demo_reviews(500, seed=3)
    frame = pl.concat([frame, frame.head(20)])  # 20 exact duplicates
    path = tmp_path / "d.csv"
    frame.write_csv(path)
    splits = splits_of(path, val_size=0.2, test_size=50)
    assert splits.report["data"]["duplicates"] >= 20
    assert len(splits.test) == 50 and len(splits.val) == round(0.2 * (len(splits.train) + len(splits.val) + 50))
    texts = [set(s["text"]) for s in (splits.train, splits.val, splits.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for part in (splits.val, splits.test):
        assert abs((part["label"] == "positive").mean() - (splits.train["label"] == "positive").mean()) < 0.05
    assert splits.labels == ["negative", "positive"]
    again = splits_of(path, val_size=0.2, test_size=50)
    assert again.test["text"].to_list() == splits.test["text"].to_list()


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "jsonl", "json"])
def test_every_table_format_reads_the_same(tmp_path, ext):
    frame = demo_reviews(100, seed=4)
    path = tmp_path / f"d.{ext}"
    {"csv": frame.write_csv, "tsv": lambda p: frame.write_csv(p, separator="\t"), "parquet": frame.write_parquet,
     "jsonl": frame.write_ndjson, "json": lambda p: p.write_text(json.dumps(frame.to_dicts(), indent=2))}[ext](path)
    loaded, report = load_labelled(str(path), "review", "sentiment")
    assert report["rows"] == 100
    assert loaded["text"].to_list()[:5] == clean_texts(frame["review"].head(5).to_list())


def test_multiclass_labels_are_sorted_names(tmp_path, capsys):
    path = tmp_path / "m.csv"
    pl.DataFrame({"review": [f"text number {i}" for i in range(90)],
                  "sentiment": ["neutral", "positive", "negative"] * 30}).write_csv(path)
    assert splits_of(path).labels == ["negative", "neutral", "positive"]
    assert "warning" not in capsys.readouterr().err


def test_a_class_of_few_training_rows_is_named_in_a_warning(tmp_path, capsys):
    # One 'mixed' review among 300 trained a three-class model without a word about it.
    path = tmp_path / "rare.csv"
    pl.concat([demo_reviews(300, seed=8), pl.DataFrame({"review": ["A middling film, neither good nor bad."],
                                                        "sentiment": ["mixed"]})]).write_csv(path)
    assert splits_of(path, val_size=0, test_size=0).labels == ["mixed", "negative", "positive"]
    err = capsys.readouterr().err
    assert "warning: few training rows for 'mixed' (1): a class needs some dozens" in err
    assert "negative" not in err and "positive" not in err
    kinds = range(8)
    rare = pl.DataFrame({"review": [f"A film of kind {i}." for i in kinds], "sentiment": [f"kind {i}" for i in kinds]})
    pl.concat([demo_reviews(300, seed=8), rare]).write_csv(path)
    splits_of(path, val_size=0, test_size=0)
    assert "few training rows for 'kind 0' (1), 'kind 1' (1), 'kind 2' (1), 'kind 3' (1), 'kind 4' (1), … (8 classes " \
           "in all)" in capsys.readouterr().err


def test_separate_val_and_test_files_use_all_training_rows_and_drop_overlap(tmp_path):
    train, held = demo_reviews(300, seed=5), demo_reviews(60, seed=6)
    pl.concat([train, held.head(5)]).write_csv(tmp_path / "train.csv")
    held.head(35).write_csv(tmp_path / "val.csv")  # its last 5 rows are test rows too
    held.tail(30).write_csv(tmp_path / "test.csv")
    splits = splits_of(tmp_path / "train.csv", val_data=str(tmp_path / "val.csv"),
                       test_data=str(tmp_path / "test.csv"))
    # A test row the best model was chosen on inflated the test accuracy: it leaves the validation rows.
    test_texts = set(clean_texts(held.tail(30)["review"].to_list()))
    assert len(splits.val) == len(set(clean_texts(held.head(35)["review"].to_list())) - test_texts)
    assert not set(splits.val["text"]) & set(splits.test["text"]) and len(splits.test) == len(test_texts)
    assert splits.report["val"]["removed_for_test"] == 5
    assert not set(splits.train["text"]) & set(splits.val["text"])
    assert splits.report["val"]["removed_from_train"] == 5
    assert len(splits.train) == len(set(clean_texts(train["review"].to_list())) - set(splits.val["text"]))


def test_a_text_under_two_labels_is_named_in_a_warning(tmp_path, capsys):
    # Deduplication kept the first label of such a text without a word.
    frame = demo_reviews(60, seed=10)
    texts, labels = frame["review"].to_list(), frame["sentiment"].to_list()
    extra = pl.DataFrame({"review": [texts[3], texts[7], texts[9]],
                          "sentiment": [{"positive": "negative", "negative": "positive"}[labels[3]], labels[7],
                                        labels[9]]})
    pl.concat([frame, extra]).write_csv(tmp_path / "d.csv")
    data, report = load_labelled(str(tmp_path / "d.csv"), "review", "sentiment")
    assert report["duplicates"] >= 3 and report["duplicates_with_other_labels"] == 1
    assert "texts that appear more than once with different labels: 1 (data rows 4 and 61)" in capsys.readouterr().err
    assert data.filter(pl.col("text") == clean_texts([texts[3]])[0])["label"].to_list() == [labels[3]]


def test_held_out_rows_that_leave_too_few_training_rows_are_named(tmp_path):
    # The --data file given again as --val-data took every row out of training; the error spoke only
    # of "0 after cleaning" and blamed --val-size.
    reviews = demo_reviews(100, seed=9)
    reviews.write_csv(tmp_path / "train.csv")
    with pytest.raises(SentimentError, match="--val-data is the --data file"):
        TrainArgs(data=str(tmp_path / "train.csv"), val_data=str(tmp_path / "train.csv"))
    # One file as both held-out splits was taken: the test accuracy was measured on the rows the best model
    # was chosen on.
    reviews.write_csv(tmp_path / "held_out.csv")
    with pytest.raises(SentimentError, match="--val-data and --test-data are both .*held_out.csv; the best model is "
                                             "chosen on the validation rows"):
        TrainArgs(data=str(tmp_path / "train.csv"), val_data=str(tmp_path / "held_out.csv"),
                  test_data=str(tmp_path / "./held_out.csv"))
    shutil.copyfile(tmp_path / "held_out.csv", tmp_path / "copy.csv")  # the same rows under another name
    with pytest.raises(SentimentError, match="copy.csv: every validation row is also in .*held_out.csv"):
        splits_of(tmp_path / "train.csv", val_data=str(tmp_path / "copy.csv"), test_data=str(tmp_path / "held_out.csv"))
    reviews.head(99).write_csv(tmp_path / "val.csv")
    kept = len(set(clean_texts(reviews["review"].to_list())))
    removed = len(set(clean_texts(reviews.head(99)["review"].to_list())))
    with pytest.raises(SentimentError, match=rf"too few rows \({kept - removed} after cleaning, deduplicating and "
                                             rf"removing {removed} that --val-data holds too\)"):
        splits_of(tmp_path / "train.csv", val_data=str(tmp_path / "val.csv"))


def test_bad_rows_stop_with_row_numbers_or_are_skipped(tmp_path):
    path = tmp_path / "bad.csv"
    frame = demo_reviews(50, seed=7).with_row_index()
    frame = frame.with_columns(
        review=pl.when(pl.col("index") == 2).then(pl.lit("<br />")).otherwise(pl.col("review")),
        sentiment=pl.when(pl.col("index") == 9).then(None).otherwise(pl.col("sentiment"))).drop("index")
    frame.write_csv(path)
    with pytest.raises(SentimentError, match=r"bad.csv: 2 rows .* \(data rows 3, 10, counting from 1 after the header"):
        load_labelled(str(path), "review", "sentiment")
    kept, report = load_labelled(str(path), "review", "sentiment", skip_bad_rows=True)
    assert report["bad_rows"] == 2 and len(kept) == 48 - report["duplicates"]
    frame.write_ndjson(tmp_path / "bad.jsonl")  # no header: the rows are the lines
    with pytest.raises(SentimentError, match=r"bad.jsonl: 2 rows .* \(data rows 3, 10, counting from 1 at the first"):
        load_labelled(str(tmp_path / "bad.jsonl"), "review", "sentiment")


def test_imdb_download_uses_the_hub_files(tmp_path, monkeypatch):
    stand_in = {}
    for split, seed in (("train", 8), ("test", 9)):
        frame = demo_reviews(200, seed=seed)
        stand_in[split] = tmp_path / f"{split}.parquet"
        frame.select(text="review", label=(pl.col("sentiment") == "positive").cast(pl.Int64)).write_parquet(
            stand_in[split])
    asked = []

    def fake_download(repo_id, filename, repo_type, local_files_only=False):  # the cache alone where offline
        asked.append((repo_id, filename, repo_type))
        return str(stand_in["train" if "train" in filename else "test"])

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    splits = load_splits(TrainArgs(data="imdb", test_size=0.5))  # test_size is ignored: the Hub has a test split
    assert {f for _, f, _ in asked} == set(data_module.IMDB_FILES.values())
    assert all(repo == "stanfordnlp/imdb" and kind == "dataset" for repo, _, kind in asked)
    assert splits.labels == ["negative", "positive"]
    assert len(splits.test) == len(set(clean_texts(demo_reviews(200, seed=9)["review"].to_list())))


def test_imdb_offline_says_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(SentimentError, match="pass a local file"):
        load_splits(TrainArgs(data="imdb"))


@pytest.mark.parametrize("problem, match", [
    ("missing", "no such file"),
    ("missing .json", "d.json: no such file"),  # a JSON file is opened to tell an array from lines: not first
    ("folder .json", "d.json: a folder, not a file"),
    ("column", r"no column 'review'; it has 'text', 'sentiment'"),
    ("one_class", "single class"),
    ("few", "too few rows"),
    ("extension", "unknown file type .xlsx"),
    # Kaggle's IMDb CSV comes as a .zip: it was "unknown file type .zip".
    ("zip", r"d.zip: a compressed file; unpack it first \(unzip .*d.zip\) and name the table in it"),
    ("ids as labels", "different labels in 32 rows, fewer than two rows a label: is 'sentiment' the label column?"),
    ("repeated column", "the header names 'review' more than once; give each column its own name"),
    ("semicolons", r"no column 'review'; it has 'review;sentiment'. The file seems separated by ';'; save it with "
                   r"commas \(.csv\) or tabs \(.tsv\)"),
    ("commas in a .tsv", r"The file seems separated by ','; name it .csv"),
    ("capitals", r"no column 'review'; it has 'Review ', 'Sentiment'. Is it 'Review '\? Name it with --text-column"),
])
def test_bad_data_errors_name_the_problem(tmp_path, problem, match):
    path = tmp_path / {"extension": "d.xlsx", "zip": "d.zip", "commas in a .tsv": "d.tsv", "missing .json": "d.json",
                       "folder .json": "d.json"}.get(problem, "d.csv")
    frame = demo_reviews(40, seed=10)
    if problem == "column":
        frame = frame.rename({"review": "text"})
    if problem == "one_class":
        frame = frame.with_columns(sentiment=pl.lit("positive"))
    if problem == "few":
        frame = frame.head(3)
    if problem == "capitals":  # as other data sets write them, a space left over from a spreadsheet
        frame = frame.rename({"review": "Review ", "sentiment": "Sentiment"})
    if problem == "ids as labels":
        frame = frame.with_columns(sentiment=pl.int_range(len(frame)).cast(pl.String))
    if problem == "folder .json":
        path.mkdir()
    elif not problem.startswith("missing"):
        frame.write_csv(path, separator=";" if problem == "semicolons" else ",")
    if problem == "repeated column":  # polars silently took the first 'review'
        path.write_text(path.read_text().replace("review,sentiment", "review,sentiment,review", 1))
    with pytest.raises(SentimentError, match=match):
        splits_of(path)


@pytest.mark.parametrize("kind, pack", [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)])
@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.parquet"])
def test_a_compressed_file_under_a_table_s_name_says_so(tmp_path, kind, pack, name):
    # A download saved as d.csv, or a .gz renamed: its bytes were read as text, and it was said to end its lines
    # in carriage returns alone (tr '\r' '\n' would not have helped), or to be text that is not UTF-8.
    path = tmp_path / name
    frame = demo_reviews(400, seed=10)
    frame.write_csv(path) if name.endswith(".csv") else frame.write_ndjson(path) if name.endswith(".jsonl") \
        else frame.write_parquet(path)
    path.write_bytes(pack(path.read_bytes()))
    stem, ext = os.path.splitext(name)
    unpack = {"gzip": "gunzip", "bzip2": "bunzip2", "xz": "unxz"}[kind]
    with pytest.raises(SentimentError) as refused:
        splits_of(path)
    assert str(refused.value) == (f"{path}: its bytes are {kind}-compressed, though it is named {ext}; unpack it "
                                  f"first: {unpack} -c {path} > {tmp_path / (stem + '-unpacked' + ext)}")


@pytest.mark.parametrize("name, record, where, key", [
    ("d.jsonl", '{"review": "dull", "sentiment": "negative", "review": "a delight"}', "an object on line 41", "review"),
    # the same key spelt with an escape, and a key repeated inside a nested object
    ("d.jsonl", '{"review": "dull", "sentiment": "negative", "sentim\\u0065nt": "positive"}', "an object on line 41",
     "sentiment"),
    ("d.jsonl", '{"review": "dull", "sentiment": "negative", "meta": {"by": "a", "by": "b"}}', "an object on line 41",
     "by"),
    ("d.json", '{"review": "dull", "sentiment": "negative", "review": "a delight"}', "an object in its array",
     "review"),
    ("d.jsonl", '{"review": "dull", "sentiment": "negative", "%s": 1, "%s": 2}' % ("k" * 10000, "k" * 10000),
     "an object on line 41", "k" * 40 + "…"),  # shown in part
], ids=["repeated", "escaped", "nested", "array", "long"])
def test_an_object_that_names_a_key_twice_is_refused_where_it_is(tmp_path, name, record, where, key):
    # polars read the first value of a key given twice, Python's json (and jq) the last: the text or label
    # trained on was a guess, and nothing said so. A header that names a column twice is refused the same way.
    path = tmp_path / name
    lines = [json.dumps(row) for row in demo_reviews(40, seed=10).to_dicts()]
    if name.endswith(".json"):
        path.write_text("[" + ",\n".join([*lines, record]) + "]")
    else:
        path.write_text("\n".join([*lines, record, ""]))
    with pytest.raises(SentimentError, match=rf"^{path}: {where} names '{key}' twice \(polars reads the first value"):
        splits_of(path)
    with pytest.raises(SentimentError, match=rf"^{path}: {where} names '{key}' twice"):
        next(tables.scan_chunks(str(path), 16))  # as infer.py reads its input
    path.write_text(path.read_text().replace(record, '{"review": "dull", "sentiment": "negative"}'))
    assert len(splits_of(path).train) > 0


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_large_file_of_json_lines_is_checked_under_one_progress_bar(tmp_path, monkeypatch, capsys, rank):
    # The check reads every line in Python, about 80 MB/s: a gigabyte was seconds of silence before the run began.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_reviews(3000, seed=10).to_dicts()))
    monkeypatch.setattr(tables, "CHECK_BAR_BYTES", path.stat().st_size)  # as large as the check's threshold
    monkeypatch.setenv("RANK", rank)  # a process of an `accelerate launch`: the first alone shows it
    assert tables.json_objects_problem(str(path), path.stat().st_size, 1) is None
    bar = capsys.readouterr().err
    if rank == "1":
        assert bar == ""
    else:
        size = tqdm.format_sizeof(path.stat().st_size)
        assert "checking the objects in d.jsonl:   0%" in bar and f"/{size}" in bar  # then cleared: leave=False
        assert tables.json_objects_problem(str(path), path.stat().st_size - 1, 1) is None  # under the threshold
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
@pytest.mark.parametrize("depth", [5000, 1000, tables.MAX_DEPTH])
def test_json_nested_too_deep_to_be_read_in_good_time_is_one_line_and_a_shallower_one_is_read(tmp_path, name, depth):
    # A field of 5,000 nested arrays: polars 2 stops at "DepthLimitExceeded", and looking for the line to name
    # ended in Python's RecursionError, a traceback; polars 1.37 crashed the process (a stack overflow) from about
    # 990. At 1,000, past Python's json, polars 2 took 36 s to read 40 lines; at 512, 158 s.
    path = tmp_path / name
    rows = [json.dumps(row) for row in demo_reviews(40, seed=10).to_dicts()]
    row = rows[20]

    def write(depth):
        rows[20] = row[:-1] + ', "tags": ' + "[" * depth + "]" * depth + "}"
        path.write_text("[" + ",\n".join(rows) + "]" if name == "d.json" else "\n".join(rows) + "\n")

    write(depth)
    where = "line 21 nests" if name == "d.jsonl" else "it nests"
    refused = rf"^{path}: could not read it as JSONL?: {where} arrays or objects more than 32 levels deep, which " \
              rf"takes polars minutes to read or crashes it; flatten"
    with pytest.raises(SentimentError, match=refused):
        splits_of(path)
    with pytest.raises(SentimentError, match=refused):
        next(tables.scan_chunks(str(path), 16))  # as infer.py reads its input
    write(tables.MAX_DEPTH - 1)  # the row, its field and 30 more levels inside it
    assert len(splits_of(path).train) > 0


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl"])
def test_lines_ended_by_a_carriage_return_alone_are_named_with_how_to_convert_them(tmp_path, name):
    # Classic Mac OS line ends (some spreadsheets' CSV exports): polars read the CSV as one header of every line
    # and no rows ("no column 'sentiment'; it has 'review', 'sentiment\r…'"), the JSON lines as an InternalError.
    path = tmp_path / name
    write = {".csv": pl.DataFrame.write_csv, ".jsonl": pl.DataFrame.write_ndjson,
             ".tsv": lambda frame, p: frame.write_csv(p, separator="\t", quote_style="never")}[path.suffix]
    write(demo_reviews(40, seed=10), path)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r"))
    with pytest.raises(SentimentError, match=rf"{path}: its lines end in a carriage return alone .*; convert them "
                                             rf"first: tr '\\r' '\\n' < {path} > {tmp_path / ('d-lf' + path.suffix)}$"):
        splits_of(path)
    path.write_bytes(path.read_bytes().replace(b"\r", b"\r\n"))  # Windows line ends are line ends
    assert len(splits_of(path).train) > 0


def test_excel_s_separator_line_is_read_as_such_and_another_separator_is_named(tmp_path):
    # Excel writes (and reads) a first line of "sep=," to name the separator: polars read it as the header,
    # columns 'sep=' and '', and training said there was no column 'review'.
    path = tmp_path / "reviews.csv"
    demo_reviews(60, seed=13).write_csv(path)
    plain = splits_of(path)
    body = path.read_bytes()
    path.write_bytes(codecs.BOM_UTF8 + b"sep=,\r\n" + body)
    assert splits_of(path).digest() == plain.digest()
    lines = body.decode().splitlines()
    lines[30] += ",a third field"
    path.write_text("sep=,\n" + "\n".join(lines) + "\n")
    with pytest.raises(SentimentError, match=r"data row 30 \(line 32\) has 3 fields where the header has 2"):
        splits_of(path)  # the line counted from the file's start, the sep= line too
    path.write_text("sep=;\nreview;sentiment\n" + "great;positive\n" * 40)
    with pytest.raises(SentimentError, match=rf"{path}: its first line, 'sep=;', is a spreadsheet's note that its "
                                             rf"fields are separated by ';', not commas; save it as CSV with commas"):
        splits_of(path)


def test_blank_lines_are_no_rows_and_a_bad_row_after_them_is_named_by_its_place(tmp_path):
    # A blank line (an editor's at the end of the file, or between rows) was a row of no text and no label:
    # training stopped on "rows with a missing or empty text or label" until --skip-bad-rows.
    path = tmp_path / "reviews.csv"
    demo_reviews(60, seed=12).write_csv(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:21], "", *lines[21:41], "", "", *lines[41:]]) + "\n\n\n")
    splits = splits_of(path)
    assert splits.report["data"] == {"rows": 60, "bad_rows": 0, "duplicates": 0}
    assert sum(splits.report["sizes"].values()) == 60
    lines = path.read_text().splitlines()
    lines[50] = lines[50].rsplit(",", 1)[0] + ","  # its label gone: data row 50 is line 51, blank lines counted
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SentimentError, match=r"1 row with a missing or empty text or label \(data rows 50,"):
        splits_of(path)


def test_a_mistyped_file_name_names_the_file_meant(tmp_path):
    demo_reviews(40, seed=10).write_csv(tmp_path / "reviews.csv")
    for typo, said in (("reveiws.csv", "no such file"), ("reviews.cvs", "unknown file type .cvs")):
        with pytest.raises(SentimentError, match=rf"{said} \(did you mean {tmp_path / 'reviews.csv'}\?\)"):
            splits_of(tmp_path / typo)
    with pytest.raises(SentimentError, match=r"no such file$"):  # nothing close: no guess
        splits_of(tmp_path / "train_set.csv")


def test_a_named_pipe_is_refused_as_one(tmp_path):
    # It was "no such file (did you mean reviews.csv?)", naming the pipe itself as the file meant.
    os.mkfifo(tmp_path / "reviews.csv")
    with pytest.raises(SentimentError, match=r"reviews.csv: a named pipe or device, not a file; save"):
        splits_of(tmp_path / "reviews.csv")


def test_labels_that_differ_only_in_case_are_named_or_merged(tmp_path, capsys):
    frame = demo_reviews(300, seed=28)
    labels = [label.capitalize() if i % 3 == 0 else label for i, label in enumerate(frame["sentiment"].to_list())]
    path = tmp_path / "d.csv"
    frame.with_columns(pl.Series("sentiment", labels)).write_csv(path)
    assert splits_of(path).labels == ["Negative", "Positive", "negative", "positive"]
    warning = capsys.readouterr().err
    assert "differ only in case" in warning and "--normalize-labels" in warning
    merged = splits_of(path, normalize_labels=True)
    assert merged.labels == ["negative", "positive"]


def test_a_numeric_text_column_and_a_folder_are_refused(tmp_path):
    numbers = pl.DataFrame({"review": list(range(50)), "sentiment": ["positive", "negative"] * 25})
    numbers.write_parquet(tmp_path / "n.parquet")
    with pytest.raises(SentimentError, match="column 'review' holds Int64 values, not text"):
        splits_of(tmp_path / "n.parquet")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(SentimentError, match="a folder, not a file"):
        splits_of(tmp_path / "folder.csv")
    for values, kind in (([["positive"], ["negative"]] * 25, r"List\(String\)"),
                         ([b"positive", b"\xff"] * 25, "Binary")):
        pl.DataFrame({"review": [f"review {i}" for i in range(50)], "sentiment": values}).write_parquet(
            tmp_path / "l.parquet")  # polars' cast error, or its "invalid utf8"
        with pytest.raises(SentimentError, match=f"column 'sentiment' holds {kind} values, not labels; name the "
                                                 f"label column with --label-column"):
            splits_of(tmp_path / "l.parquet")


def test_a_broken_json_lines_file_names_its_line(tmp_path):
    lines = [f'{{"review": "text {i}", "sentiment": "positive"}}' for i in range(30)]
    lines[17] = '{"review": "text'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SentimentError, match="line 18 is not valid JSON"):
        splits_of(tmp_path / "d.jsonl")


def test_json_lines_that_start_with_a_byte_order_mark_say_so(tmp_path):
    # It was "line 1 is not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))": no line is wrong.
    lines = [f'{{"review": "text {i}", "sentiment": "{("positive", "negative")[i % 2]}"}}' for i in range(30)]
    (tmp_path / "d.jsonl").write_bytes(codecs.BOM_UTF8 + "\n".join(lines).encode())
    with pytest.raises(SentimentError, match=r"d.jsonl: could not read it as JSONL: it starts with a byte-order mark"):
        splits_of(tmp_path / "d.jsonl")


def test_a_broken_json_array_names_its_line_and_column(tmp_path):
    # polars said "Syntax at character 0" wherever the array broke.
    records = [f'  {{"review": "text {i}", "sentiment": "positive"}},' for i in range(30)]
    records[16] = '  {"review": "text 16", "sentiment": },'
    (tmp_path / "d.json").write_text("[\n" + "\n".join(records)[:-1] + "\n]\n")
    with pytest.raises(SentimentError, match=r"could not read it as JSON: line 18, column 38 is not valid JSON"):
        splits_of(tmp_path / "d.json")


@pytest.mark.parametrize("encode, match", [
    (lambda text: text.encode("latin-1"), "line 4 is not valid UTF-8; convert the file"),
    (lambda text: text.encode("utf-16"), "it is UTF-16 text; save it as UTF-8"),
    (lambda text: text.encode("utf-16-le"), "line 1 holds NUL bytes, as UTF-16 text does"),
], ids=["latin-1", "utf-16", "utf-16 without a byte-order mark"])
def test_a_table_that_is_not_utf8_says_so_and_how_to_convert_it(tmp_path, encode, match):
    text = demo_reviews(40, seed=11).write_csv()
    lines = text.splitlines(keepends=True)
    lines[3] = '"un film très réussi",positive\n'
    (tmp_path / "d.csv").write_bytes(encode("".join(lines)))
    with pytest.raises(SentimentError, match=match):
        splits_of(tmp_path / "d.csv")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())  # UTF-8 with a BOM is UTF-8
    assert splits_of(tmp_path / "bom.csv").report["data"]["rows"] == 40


def test_unknown_labels_of_a_validation_file_are_named_ten_at_most(tmp_path):
    demo_reviews(200, seed=12).write_csv(tmp_path / "train.csv")
    val = demo_reviews(40, seed=13).with_columns(sentiment=pl.format("grade {}", pl.int_range(40) % 15))
    val.write_csv(tmp_path / "val.csv")
    with pytest.raises(SentimentError, match=r"never show: grade 0, grade 1, grade 10, .*, … \(15 in all\)$"):
        splits_of(tmp_path / "train.csv", val_data=str(tmp_path / "val.csv"))


def test_a_json_array_named_as_json_lines_says_what_it_is(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(demo_reviews(40, seed=5).to_dicts(), indent=2))
    with pytest.raises(SentimentError, match=r"it is one JSON array, not JSON lines .*name it \.json"):
        splits_of(tmp_path / "d.jsonl")


@pytest.mark.parametrize("name, bad_line, match", [
    ("d.csv", 'A film, good and long,positive', r"data row 7 \(line 9\) has 3 fields where the header has 2; put a "
                                                r"text that holds a comma in double quotes"),
    ("d.csv", '"A film" I loved,positive', r"data row 7 \(from line 9\) has a quote that does not close where it "
                                           r"should"),
    ("d.tsv", 'A film\tgood\tpositive', r"data row 7 \(line 8\) has 3 fields where the header has 2; a text may "
                                        r"not hold a tab in TSV \(it has no quoting\)"),
])
def test_a_row_with_a_stray_comma_or_quote_names_its_row_and_line(tmp_path, name, bad_line, match):
    """polars says only 'found more fields than defined in Schema' or quotes a page of the file."""
    from sentiment.tables import scan_chunks
    separator = "\t" if name.endswith(".tsv") else ","
    rows = [f"review{separator}sentiment"] + [f"Review number {i}{separator}positive" for i in range(1, 41)]
    if separator == ",":
        rows[3] = '"A review over\ntwo lines",negative'  # a quoted line break: rows and lines part ways
    rows[7] = bad_line
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(SentimentError, match=match):
        splits_of(path)  # training reads the table whole
    with pytest.raises(SentimentError, match=match):
        list(scan_chunks(str(path), 10))  # infer.py reads it in chunks


def test_a_header_with_a_stray_quote_is_named_as_the_header(tmp_path):
    # The check that names a broken row read the header outside its guard: a traceback from the csv module.
    from sentiment.tables import scan_chunks
    path = tmp_path / "d.csv"
    path.write_text('"review" text,sentiment\nA film, good and long,positive\n')
    match = r"the header \(line 1\) has a quote that does not close where it should"
    with pytest.raises(SentimentError, match=match):
        splits_of(path)
    with pytest.raises(SentimentError, match=match):
        list(scan_chunks(str(path), 10))


@pytest.mark.parametrize("dtype", [pl.Categorical, pl.Enum])
def test_texts_and_labels_stored_as_categories_are_text(tmp_path, dtype):
    frame = demo_reviews(60, seed=11)
    path = tmp_path / "d.parquet"
    as_category = (lambda c: pl.col(c).cast(pl.Enum(frame[c].unique().sort().to_list()))) if dtype is pl.Enum \
        else (lambda c: pl.col(c).cast(pl.Categorical))
    frame.with_columns(as_category("review"), as_category("sentiment")).write_parquet(path)  # as pandas' category
    loaded, _ = load_labelled(str(path), "review", "sentiment")  # was "holds Categorical values, not text"
    assert loaded["text"].to_list() == clean_texts(frame["review"].unique(maintain_order=True).to_list())
    assert loaded["label"].to_list() == frame.unique("review", maintain_order=True)["sentiment"].to_list()


def test_float_labels_with_gaps_are_whole_numbers_and_nan_is_a_missing_label(tmp_path):
    # pandas stores integer labels with a gap as floats: NaN trained as a third class "NaN", and "1.0" was a
    # class where the same labels in a CSV are "1".
    frame = demo_reviews(200, seed=12).with_columns(
        pl.when(pl.int_range(pl.len()) % 50 == 0).then(float("nan"))
        .otherwise(pl.col("sentiment").replace_strict({"negative": 0.0, "positive": 1.0})).alias("sentiment"))
    frame.write_parquet(tmp_path / "d.parquet")
    with pytest.raises(SentimentError, match="4 rows with a missing or empty text or label"):
        splits_of(tmp_path / "d.parquet")
    assert splits_of(tmp_path / "d.parquet", skip_bad_rows=True).labels == ["0", "1"]


@pytest.mark.parametrize("name, content, said", [
    ("d.csv", b"", "could not read it.*: the file is empty$"),
    ("d.jsonl", b"\n \n", "could not read it.*: the file is empty$"),
    ("d.parquet", b"", "could not read it.*: the file is empty$"),
    ("d.jsonl", b'{"review": "a", "sentiment": "positive"}\n{"review": "b", "sentiment": NaN}\n',
     r"line 2 is not valid JSON \(NaN is not JSON; write null or a number\)"),
    ("d.jsonl", b'{"review": "a", "sentiment": "positive"}\n"b"\n',
     r"line 2 holds a JSON string, not an object: JSON lines hold one object a line"),
    ("d.json", b'[{"review": "a", "sentiment": "positive"}, 7]',
     r"item 2 of its array is a JSON number, not an object"),
    ("d.json", b"[]", "no column 'review'; it has no columns at all"),
    ("d.csv", b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)),
     r"it is a zip archive, not text \(an .xlsx spreadsheet is one\); save the sheet as CSV"),
    ("d.csv", b"\x89review\x8a,sentiment\xff\nok,positive\n", r"line 1 is not valid UTF-8; convert the file"),
    ("d.csv", ",".join(f"c{i}" for i in range(300)).encode() + b"\n" + b"1," * 299 + b"1\n",
     r"no column 'review'; it has 'c0', 'c1', .*, 'c19', … \(300 in all\)\. Name the right one"),
])
def test_empty_binary_and_non_object_inputs_are_named_as_such(tmp_path, name, content, said):
    """polars said "empty CSV", "Cannot infer NDJSON types on empty reader", "InternalError(TapeError)", "NDJSON
    line expected to contain JSON object: i64", or listed a binary file's first line as its columns."""
    from sentiment import inference
    from sentiment.config import InferArgs, parse_args
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SentimentError, match=said):  # infer.py checks its input before the model loads
        inference.check_input(parse_args(InferArgs, "", ["--input", str(path)]))
    with pytest.raises(SentimentError, match=said):
        splits_of(path)
