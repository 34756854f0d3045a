"""Batch scoring of texts and files: the work behind `infer.py`.

Reads the input in chunks (memory stays bounded on a file of millions of rows), scores each
chunk with the `Predictor`, and appends it to the output in input order, with the input's
other columns kept, so rows already scored are on disk if a later chunk fails. Under
`accelerate launch`, every process scores its share of each chunk and the main process writes.
When the input carries labels, it reports accuracy, macro F1 and the confusion matrix.
"""

import json
import os
import sys

import numpy as np
import polars as pl
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .data import check_columns
from .errors import SentimentError
from .metrics import classification_report
from .predictor import Predictor
from .tables import SCANNERS, TableWriter, extension, scan_chunks


def text_lines(stream, column, chunk_rows):
    chunk = []
    for line in stream:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) == chunk_rows:
            yield pl.DataFrame({column: chunk})
            chunk = []
    if chunk:
        yield pl.DataFrame({column: chunk})


def read_chunks(path, column, chunk_rows):
    """Frames of at most `chunk_rows` rows from a table, a text file or stdin ('-')."""
    if path == "-":
        yield from text_lines(sys.stdin, column, chunk_rows)
    elif extension(path) == ".txt":
        if not os.path.isfile(path):
            raise SentimentError(f"{path}: no such file")
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from text_lines(f, column, chunk_rows)
    elif extension(path) not in SCANNERS:
        raise SentimentError(f"{path}: unknown file type {extension(path) or '(none)'}; use .txt or one of "
                             f"{', '.join(SCANNERS)}")
    else:
        yield from scan_chunks(path, chunk_rows)


def scored_columns(frame, labels, answers):
    """The input frame with label, score, score_<label> and error columns added."""
    columns = {"label": [a["label"] for a in answers], "score": [a["score"] for a in answers]}
    for name in labels:
        columns[f"score_{name}"] = [a["scores"][name] if a["scores"] else None for a in answers]
    columns["error"] = [a.get("error") for a in answers]
    return frame.with_columns(pl.Series(k, v, dtype=pl.Float64 if k.startswith("score") else pl.String)
                              for k, v in columns.items())


def make_predictor(args, device):
    return Predictor(args.model, device=device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                     max_length=args.max_length, threads=args.threads, quantize=args.quantize,
                     precision=args.precision)


def print_answers(texts, answers):
    """One JSON line per text: the text, its label, score and every label's score (or its error)."""
    for text, answer in zip(texts, answers):
        print(json.dumps({"text": text, **answer}, ensure_ascii=False))


def score_file(args, state):
    """Score `args.input` chunk by chunk; returns the label metrics, if the input had labels."""
    predictor = make_predictor(args, state.device if state.num_processes > 1 else args.device)
    index = {name: i for i, name in enumerate(predictor.labels)}
    writer = TableWriter(args.output) if args.output and state.is_main_process else None
    y_true, y_pred, errors = [], [], 0
    label_column = args.label_column
    bar = tqdm(desc="scoring", unit=" rows", disable=not state.is_main_process or not args.output)
    for number, frame in enumerate(read_chunks(args.input, args.text_column, args.chunk_rows)):
        if number == 0:
            check_columns(frame, args.input, args.text_column)
            if label_column is None and "sentiment" in frame.columns and args.text_column != "sentiment":
                label_column = "sentiment"
            if label_column and label_column not in frame.columns:
                raise SentimentError(f"{args.input}: no label column {label_column!r}; it has "
                                     f"{', '.join(map(repr, frame.columns))}")
        texts = frame[args.text_column].cast(pl.String).to_list()
        with state.split_between_processes(list(range(len(texts)))) as mine:
            probs = predictor.probabilities([texts[i] for i in mine])
        if state.num_processes > 1:
            probs = np.concatenate([p for p in gather_object([probs]) if len(p)] or [probs])
        if not state.is_main_process:
            continue
        answers = [predictor.answer(p) for p in probs]
        out = scored_columns(frame, predictor.labels, answers)
        errors += out["error"].is_not_null().sum()
        if label_column:
            known = out.filter(pl.col("error").is_null() & pl.col(label_column).cast(pl.String).is_in(list(index)))
            y_true += [index[v] for v in known[label_column].cast(pl.String).to_list()]
            y_pred += [index[v] for v in known["label"].to_list()]
        if writer:
            writer.write(out)
        else:
            print_answers(texts, answers)
        bar.update(len(frame))
    bar.close()
    if writer:
        writer.close()
    if state.is_main_process and errors:
        print(f"{errors} rows had no text to score; their 'error' column says so", file=sys.stderr)
    if state.is_main_process and label_column:
        return classification_report(y_true, y_pred, predictor.labels)
    return None


def run(args):
    # Several CPU processes (`accelerate launch` without a GPU) talk over gloo.
    state = PartialState(cpu=int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available())
    if args.texts:
        print_answers(args.texts, make_predictor(args, args.device).predict(args.texts))
        return
    report = score_file(args, state)
    if state.num_processes > 1:  # leave together, or gloo's threads abort the process that leaves first
        state.wait_for_everyone()
        state.destroy_process_group()
    if report:
        print(f"accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f} on {report['examples']} rows; "
              f"confusion (rows true, columns predicted, {report['confusion_matrix']['labels']}): "
              f"{report['confusion_matrix']['rows_true_columns_predicted']}", file=sys.stderr)
        if args.metrics_out:
            with open(args.metrics_out, "w") as f:
                json.dump(report, f, indent=2)
