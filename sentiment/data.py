"""Tables of labelled text: read, clean, check, dedupe, split, name the labels.

Everything here is polars and numpy; nothing knows about tokens or models. The output is a
`Splits` of plain Python lists that `batching` tokenises. `clean_texts` is the one text
cleaning used everywhere, training and inference alike, so scores match what validation saw.
"""

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from .errors import SentimentError, n_rows, warn
from .hub import download_options, offline_note
from .tables import extension, garbled_header, read_table

IMDB_REPO = "stanfordnlp/imdb"
IMDB_FILES = {"train": "plain_text/train-00000-of-00001.parquet",
              "test": "plain_text/test-00000-of-00001.parquet"}
IMDB_LABELS = {0: "negative", 1: "positive"}
SHOWN_ROWS = 5  # how many bad row numbers an error message lists
SHOWN_COLUMNS = 20  # how many of a file's columns an error message lists
RARE_CLASS_ROWS = 20  # a class with fewer training rows is named in a warning


MARKUP = r"<[^>]*>"  # HTML tags such as `<br />`, which IMDb reviews are full of


def clean_expr(expr):
    """Strip HTML tags and fold runs of whitespace into one space."""
    return (expr.str.replace_all(MARKUP, " ")
                .str.replace_all(r"\s+", " ")
                .str.strip_chars())


def clean_texts(texts):
    """`clean_expr` applied to a list of strings (None stays None)."""
    return pl.Series(texts, dtype=pl.String).to_frame("t").select(clean_expr(pl.col("t"))).to_series().to_list()


def only_markup(text):
    """Whether `text` cleans to nothing, as `clean_expr` would find: one string, in plain Python, for a
    request handler. It scans for `<` and `>` once: a backtracking regex took seconds on a text of
    thousands of unclosed `<`, and polars' linear-time engine costs a call per string."""
    i = 0
    while True:
        start = text.find("<", i)
        if text[i:start if start >= 0 else None].strip():
            return False
        end = text.find(">", start + 1) if start >= 0 else -1
        if end < 0:  # no tag left: what remains is text (an unclosed `<` is text too)
            return start < 0
        i = end + 1


def check_columns(frame, path, *columns):
    for column in columns:
        if column not in frame.columns:
            problem = garbled_header(path, frame.columns)
            if problem:
                raise SentimentError(f"{path}: {problem}")
            if not frame.columns:
                raise SentimentError(f"{path}: no column {column!r}; it has no columns at all (no rows to read them "
                                     f"from)")
            # A header of one column holding ';' or '|' is a file separated by them (European spreadsheets).
            separator = next((c for c in ";|\t," if len(frame.columns) == 1 and c in frame.columns[0]), None)
            fixes = {",": "name it .csv", "\t": "name it .tsv"}
            fix = fixes.get(separator, "save it with commas (.csv) or tabs (.tsv)")
            near = [c for c in frame.columns if c.strip().casefold() == column.strip().casefold()]  # 'Review '
            advice = (f"The file seems separated by {separator!r}; {fix}" if separator
                      else f"Is it {near[0]!r}? Name it with --text-column / --label-column" if near
                      else "Name the right one with --text-column / --label-column")
            shown = ", ".join(map(repr, frame.columns[:SHOWN_COLUMNS]))
            more = f", … ({len(frame.columns)} in all)" if len(frame.columns) > SHOWN_COLUMNS else ""
            raise SentimentError(f"{path}: no column {column!r}; it has {shown}{more}. {advice}")


def check_text_column(frame, path, column):
    """The column is there and holds text (numbers or lists there mean the wrong column was named)."""
    check_columns(frame, path, column)
    if not isinstance(frame.schema[column], (pl.String, pl.Null, pl.Categorical, pl.Enum)):  # read as strings
        raise SentimentError(f"{path}: column {column!r} holds {frame.schema[column]} values, not text; "
                             f"name the text column with --text-column")


def holds_labels(dtype):
    """Whether a column of `dtype` can hold labels: text, numbers or true/false, not lists, bytes or times."""
    return dtype.is_numeric() or isinstance(dtype, (pl.String, pl.Categorical, pl.Enum, pl.Null, pl.Boolean))


def check_label_column(frame, path, column):
    """The column is there and holds labels (a column of lists or bytes failed with polars' cast error)."""
    check_columns(frame, path, column)
    if not holds_labels(frame.schema[column]):
        raise SentimentError(f"{path}: column {column!r} holds {frame.schema[column]} values, not labels; name the "
                             f"label column with --label-column")


def label_text(labels):
    """A column of labels as text, spaces around them dropped. In a column of floats (pandas' integers with a
    gap) NaN is a missing label, not a class, and whole numbers are written as such: 1, not 1.0."""
    if labels.dtype.is_float():
        labels = labels.fill_nan(None)
        known = labels.drop_nulls()
        if known.is_finite().all() and (known == known.round()).all():
            labels = labels.cast(pl.Int64)
    return labels.cast(pl.String).str.strip_chars()


def load_labelled(path, text_column, label_column, skip_bad_rows=False, frame=None):
    """Read `path` into a frame of cleaned `text` and string `label`, one row per usable review.

    Rows with a missing or empty text or a missing label stop the run with their row numbers,
    or are dropped and counted when `skip_bad_rows` is set; blank lines are passed over. Returns (frame, report).
    """
    frame = read_table(path) if frame is None else frame
    check_text_column(frame, path, text_column)
    check_label_column(frame, path, label_column)
    # A row of no value at all is a blank line (an editor's at the end of a CSV): no row, as pandas and csv read it.
    blank = frame.select(pl.all_horizontal(pl.all().is_null())).to_series()
    frame = frame.select(
        text=clean_expr(pl.col(text_column).cast(pl.String)),
        label=label_text(frame[label_column]),
    ).with_row_index("row", offset=1).filter(~blank)  # numbered first: a row's number is still its place
    bad = frame.filter(pl.col("text").is_null() | (pl.col("text") == "")
                       | pl.col("label").is_null() | (pl.col("label") == ""))
    if len(bad) and not skip_bad_rows:
        rows = ", ".join(map(str, bad["row"].head(SHOWN_ROWS).to_list()))
        more = " …" if len(bad) > SHOWN_ROWS else ""
        counted = "after the header" if extension(path) in (".csv", ".tsv") else "at the first row"
        raise SentimentError(f"{path}: {n_rows(len(bad))} with a missing or empty text or label (data rows "
                             f"{rows}{more}, counting from 1 {counted}); fix them or pass --skip-bad-rows to drop them")
    frame = frame.join(bad.select("row"), on="row", how="anti", maintain_order="left")
    deduped = frame.unique(subset="text", keep="first", maintain_order=True)
    report = {"rows": len(frame) + len(bad), "bad_rows": len(bad), "duplicates": len(frame) - len(deduped)}
    # The same text under two labels: the first is kept, and the data's owner should know.
    clashes = (frame.group_by("text", maintain_order=True).agg(pl.col("row"), pl.col("label").n_unique())
               .filter(pl.col("label") > 1))
    if len(clashes):
        report["duplicates_with_other_labels"] = len(clashes)
        shown = "; ".join(" and ".join(map(str, rows[:3])) for rows in clashes["row"].head(SHOWN_ROWS).to_list())
        warn(f"{path}: texts that appear more than once with different labels: {len(clashes)} (data rows "
             f"{shown}{' …' if len(clashes) > SHOWN_ROWS else ''}); each keeps the label of its first row")
    return deduped.drop("row"), report


def stratified_order(labels, seed):
    """A permutation of row indices whose every prefix holds the classes in their overall proportions.

    Each row gets the position (rank + jitter) / class size inside its shuffled class; sorting by it
    interleaves the classes evenly, so taking the first n rows is a stratified sample of n.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    position = np.empty(len(labels))
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        position[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(position, kind="stable")


def split_count(size, total):
    """`size` is a fraction (< 1) or a count of rows; return the count (at least 1 if asked for any)."""
    return max(1, int(round(size * total))) if 0 < size < 1 else int(size)


@dataclass
class Splits:
    labels: list  # class names, sorted; the model's class i is labels[i]
    train: pl.DataFrame
    val: pl.DataFrame  # may be empty: then the last model is kept
    test: pl.DataFrame  # may be empty: then there is no test figure
    report: dict

    def leave_out_untokenised(self, split, kept):
        """The frame of `split` with only the rows `kept` (a mask) marks; the others, whose text the tokenizer
        keeps nothing of, are counted in the report (`no_tokens`) and its sizes."""
        before = getattr(self, split)
        frame = before.filter(pl.Series(kept))
        setattr(self, split, frame)
        self.report["data"]["no_tokens"] = self.report["data"].get("no_tokens", 0) + len(before) - len(frame)
        self.report["sizes"][split] = len(frame)
        return frame

    def label_ids(self, frame):
        index = {name: i for i, name in enumerate(self.labels)}
        return [index[name] for name in frame["label"].to_list()]

    def digest(self):
        """A digest of every split's texts and labels, in order. A resumed run compares it with its
        checkpoint's: data edited in between would otherwise move rows silently between the splits."""
        digest = hashlib.blake2b(digest_size=16)
        for frame in (self.train, self.val, self.test):
            for column in ("text", "label"):
                for value in frame[column].to_list():
                    digest.update(value.encode("utf-8", "surrogatepass") + b"\0")
            digest.update(b"\1")
        return digest.hexdigest()


def download_imdb():
    """Fetch the IMDb train and test parquet files from the Hub; offline, say what to do instead."""
    from huggingface_hub import hf_hub_download

    paths = {}
    for split, filename in IMDB_FILES.items():
        try:
            paths[split] = hf_hub_download(IMDB_REPO, filename, repo_type="dataset", **download_options())
        except Exception as err:  # offline, proxy, missing cache: all mean the same to the user
            raise SentimentError(f"--data imdb: could not download {IMDB_REPO} from the Hugging Face Hub "
                                 f"({type(err).__name__}{offline_note()}); pass a local file instead, e.g. --data "
                                 f"'IMDB Dataset.csv'") from None
    return paths


def load_imdb_frame(path):
    frame = read_table(path)
    check_columns(frame, path, "text", "label")
    return frame.with_columns(pl.col("label").replace_strict(IMDB_LABELS, return_dtype=pl.String))


def merge_label_variants(frames, normalize):
    """Labels that differ only in case ('Positive', 'positive') are one class with `normalize` (lower-cased),
    and two classes, with a warning, without it."""
    if normalize:
        return {split: frame.with_columns(pl.col("label").str.to_lowercase()) for split, frame in frames.items()}
    names = sorted({name for frame in frames.values() for name in frame["label"].unique().to_list()})
    variants = {}
    for name in names:
        variants.setdefault(name.lower(), []).append(name)
    clashes = [group for group in variants.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(", ".join(map(repr, group)) for group in clashes[:3])
        warn(f"labels that differ only in case count as different classes ({shown}); pass --normalize-labels "
             f"to merge them")
    return frames


def read_frames(args):
    """The training rows and any held-out validation or test files of a `TrainArgs`, read, cleaned and
    with labels checked; held-out reviews are removed from the training rows. Returns (data, held_out, reports)."""
    text_col, label_col = args.text_column, args.label_column
    given = {"val": args.val_data, "test": args.test_data}
    if args.data == "imdb":
        paths = download_imdb()
        text_col, label_col = "text", "label"
        frames = {"train": load_imdb_frame(paths["train"]), "test": load_imdb_frame(paths["test"])}
        given["test"] = given["test"] or paths["test"]
    elif args.data == "demo":
        from .demo_data import demo_reviews
        frames = {"train": demo_reviews(2000, seed=args.seed)}
    else:
        frames = {}

    def load(split, path):
        return load_labelled(path, text_col, label_col, args.skip_bad_rows, frames.get(split))

    data, report = load("train", args.data)
    reports = {"data": report}
    held_out = {}
    for split, path in given.items():
        if path:
            held_out[split], reports[split] = load(split, path)
            # A review in both a held-out file and the training data would inflate its score.
            before = len(data)
            data = data.join(held_out[split].select("text"), on="text", how="anti", maintain_order="left")
            reports[split]["removed_from_train"] = before - len(data)
    if len(held_out) == 2:  # the best model is chosen on the validation rows: none of them may be a test row
        before = len(held_out["val"])
        held_out["val"] = held_out["val"].join(held_out["test"].select("text"), on="text", how="anti",
                                               maintain_order="left")
        reports["val"]["removed_for_test"] = before - len(held_out["val"])
        if not len(held_out["val"]):
            raise SentimentError(f"{args.val_data}: every validation row is also in {args.test_data}; validate on "
                                 f"other rows than the test")
    frames = merge_label_variants({"train": data, **held_out}, args.normalize_labels)
    return frames.pop("train"), frames, reports


def load_splits(args):
    """Read, clean, dedupe and split the data named by a `TrainArgs`."""
    data, held_out, reports = read_frames(args)
    order = stratified_order(data["label"].to_numpy(), args.seed)
    counts = {split: 0 if split in held_out else split_count(getattr(args, f"{split}_size"), len(data))
              for split in ("test", "val")}
    if counts["test"] + counts["val"] >= len(data) or len(data) - counts["test"] - counts["val"] < 2:
        removed = [f"{reports[split]['removed_from_train']} that --{split}-data holds too" for split in held_out
                   if reports[split]["removed_from_train"]]
        raise SentimentError(f"{args.data}: too few rows ({len(data)} after cleaning, deduplicating"
                             f"{' and removing ' + ' and '.join(removed) if removed else ''}) for {counts['val']} "
                             f"validation and {counts['test']} test rows; lower --val-size / --test-size or add data")
    test_idx, rest = order[:counts["test"]], order[counts["test"]:]
    val_idx, train_idx = rest[:counts["val"]], rest[counts["val"]:]
    carved = {"test": data[np.sort(test_idx)], "val": data[np.sort(val_idx)]}
    train = data[np.sort(train_idx)]
    val = held_out.get("val", carved["val"])
    test = held_out.get("test", carved["test"])

    labels = sorted(set(train["label"].to_list()))
    if len(labels) > max(2, len(train) // 2):  # an id or free-text column named by mistake
        raise SentimentError(f"{args.data}: the training rows hold {len(labels)} different labels in {len(train)} "
                             f"rows, fewer than two rows a label: is {args.label_column!r} the label column? "
                             f"Name it with --label-column")
    if len(labels) < 2:
        raise SentimentError(f"{args.data}: the training rows hold a single class ({labels[0] if labels else 'none'}); "
                             f"a classifier needs two or more")
    rare = sorted((label, n) for label, n in train["label"].value_counts().iter_rows() if n < RARE_CLASS_ROWS)
    if rare:
        shown = ", ".join(f"{label!r} ({count})" for label, count in rare[:5]) + (
            f", … ({len(rare)} classes in all)" if len(rare) > 5 else "")
        warn(f"few training rows for {shown}: a class needs some dozens to be learnt, and figures for it from "
             f"so few validation and test rows mean little")
    for split, frame in (("validation", val), ("test", test)):
        unknown = sorted(set(frame["label"].to_list()) - set(labels))
        if unknown:
            raise SentimentError(f"{split} data has labels the training rows never show: {', '.join(unknown[:10])}"
                                 + (f", … ({len(unknown)} in all)" if len(unknown) > 10 else ""))
    reports["sizes"] = {"train": len(train), "val": len(val), "test": len(test)}
    return Splits(labels=labels, train=train, val=val, test=test, report=reports)
