"""The training report: one self-contained HTML page, plots embedded, from a model folder's
`log.jsonl` and `metrics.json` alone.

It shows the run's headline figures and settings, the training loss and learning rate by step,
validation accuracy and loss by evaluation, the test confusion matrix, and the reliability
diagram before and after calibration. `train.py` writes it as `report.html` at the end of every
run; `python -m sentiment.report OUT` rebuilds it. Plots need matplotlib, an optional extra
(`pip install -e ".[report]"`); without it training still succeeds and says how to get the page.
"""

import argparse
import base64
import html
import io
import json
import os
import sys

from .config import CONFIG_FILE, LOG_FILE, METRICS_FILE
from .errors import SentimentError, exit_on_user_error, json_type
from .files import write_atomically

REPORT_FILE = "report.html"
MAX_FIGURE_INCHES, MAX_COUNTS_SHOWN, MAX_NAMES_SHOWN = 16, 20, 60  # the confusion matrix of many classes
INSTALL_HINT = 'pip install -e ".[report]" (matplotlib), then python -m sentiment.report'


def read_folder(folder):
    """(log records, metrics, run settings) of a model folder. A log line cut short or garbled, or a record
    that is not an object, is passed over; metrics.json and train_config.json must be JSON objects."""
    records = []
    with open(os.path.join(folder, LOG_FILE), encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                records.append(record)
    metrics = read_object(os.path.join(folder, METRICS_FILE))
    config_path = os.path.join(folder, CONFIG_FILE)
    config = read_object(config_path) if os.path.exists(config_path) else {}
    return records, metrics, config


def read_object(path):
    """The JSON object in `path`, or a SentimentError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as err:  # not JSON, or not UTF-8 (a ValueError too)
        raise SentimentError(f"{path} is not JSON ({type(err).__name__}: {str(err)[:200]}); train.py "
                             f"writes it whole at the end of a run") from None
    if not isinstance(value, dict):
        raise SentimentError(f"{path} holds a JSON {json_type(value)}, not an object; train.py writes it "
                             f"whole at the end of a run")
    return value


def numbers(record, *keys):
    """Whether `record` holds a number (not a bool) under each of `keys`: the points a plot can draw."""
    return all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)


def embedded(figure, plt):
    """The figure as an <img> whose PNG is inside the page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def training_plot(records, plt):
    steps = [r for r in records if numbers(r, "step", "loss", "lr")]
    figure, (loss, lr) = plt.subplots(1, 2, figsize=(10, 3.2))
    loss.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    loss.set(title="training loss", xlabel="step")
    lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange")
    lr.set(title="learning rate", xlabel="step")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    figure.tight_layout()
    return embedded(figure, plt)


def evaluations(records):
    """The validation records a plot can draw."""
    return [r for r in records if r.get("split") == "val" and numbers(r, "step", "accuracy", "loss")]


def validation_plot(evals, plt):
    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(10, 3.2))
    accuracy.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], marker="o")
    accuracy.set(title="validation accuracy", xlabel="step")
    loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], marker="o", color="tab:red")
    loss.set(title="validation loss", xlabel="step")
    figure.tight_layout()
    return embedded(figure, plt)


def as_text(label):
    """A label as matplotlib draws it literally: between two `$` it reads mathematics (and "$$" fails)."""
    return label.replace("$", r"\$")


def confusion_plot(metrics, plt):
    confusion = metrics["test"]["confusion_matrix"]
    labels, counts = confusion["labels"], confusion["rows_true_columns_predicted"]
    # Hundreds of classes would make a picture of gigapixels: the size is capped, and past a few dozen
    # classes the counts (all in metrics.json) and then the names are left out of it.
    size = min(1.2 * len(labels) + 2, MAX_FIGURE_INCHES)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(counts, cmap="Blues")
    darkest = max(max(row) for row in counts)
    for i, row in enumerate(counts if len(labels) <= MAX_COUNTS_SHOWN else []):
        for j, n in enumerate(row):  # white on the dark cells, so every count can be read
            axes.text(j, i, str(n), ha="center", va="center", color="white" if n > darkest / 2 else "black")
    ticks = range(len(labels)) if len(labels) <= MAX_NAMES_SHOWN else []
    names = [as_text(labels[i]) for i in ticks]
    axes.set(xticks=ticks, yticks=ticks, xticklabels=names, yticklabels=names, xlabel="predicted", ylabel="true",
             title="test confusion matrix")
    return embedded(figure, plt)


def reliability_plot(metrics, plt):
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for when in ("before", "after"):
        ece, bins = metrics[f"test_ece_{when}_calibration"], metrics["test_reliability"][when]
        axes.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", label=f"{when} calibration (ECE {ece:.3f})")
    axes.set(xlabel="confidence", ylabel="accuracy", title="reliability on the test rows", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left")
    return embedded(figure, plt)


def headline(metrics):
    keys = ("test_accuracy", "test_macro_f1", "val_accuracy", "test_ece_before_calibration",
            "test_ece_after_calibration", "temperature", "best_step", "steps", "train_samples_per_second",
            "train_seconds", "wall_seconds", "stopped_early")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def table(values):
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def write_report(folder):
    """Write `report.html` into the model folder; ImportError if matplotlib is missing."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    records, metrics, config = read_folder(folder)
    sections = [("Headline figures", table(headline(metrics))), ("Training", training_plot(records, plt))]
    if evals := evaluations(records):
        sections.append(("Validation", validation_plot(evals, plt)))
    if "test" in metrics:
        sections.append(("Test", confusion_plot(metrics, plt) + reliability_plot(metrics, plt)))
    sections.append(("Settings", table(config)))
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Training report: {html.escape(folder)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left;padding-right:1em}"
            f"img{{max-width:100%}}</style></head><body><h1>Training report</h1><p>{html.escape(folder)}</p>{body}"
            "</body></html>")
    path = os.path.join(folder, REPORT_FILE)
    write_atomically(path, page)
    return path


def write_report_or_say_how(folder):
    """The end of every training run: the report, or one line saying how to get it."""
    try:
        print(f"report: {write_report(folder)}")
    except ImportError:
        print(f"report.html not written: {INSTALL_HINT} {folder}")
    except Exception as err:  # the model is published by now: a failing picture must not fail the run
        print(f"report.html not written ({type(err).__name__}: {str(err).strip()[:200]}); the model folder is "
              f"complete; python -m sentiment.report {folder} tries again", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sentiment.report", description="Rebuild report.html of a "
                                     "model folder from log.jsonl and metrics.json.")
    parser.add_argument("folder", help="A model folder written by train.py.")
    args = parser.parse_args(argv)
    with exit_on_user_error():  # exit status 2, as train.py and infer.py
        for name in (LOG_FILE, METRICS_FILE):
            if not os.path.isfile(os.path.join(args.folder, name)):
                raise SentimentError(f"{args.folder}: no {name}; name a model folder written by train.py")
        try:
            print(write_report(args.folder))
        except ImportError:
            raise SentimentError(f"the report needs matplotlib: {INSTALL_HINT} {args.folder}") from None
        except (KeyError, IndexError, TypeError, ValueError) as err:  # the log's points are checked as read
            raise SentimentError(f"{os.path.join(args.folder, METRICS_FILE)} holds what the report cannot draw "
                                 f"({type(err).__name__}: {str(err)[:200]}); train.py writes it whole at the end "
                                 f"of a run") from None


if __name__ == "__main__":
    main()
