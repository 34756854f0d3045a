"""Batch scoring of texts and files: the work behind `infer.py`.

Reads the input in chunks (memory stays bounded on a file of millions of rows), scores each
chunk with the `Predictor`, and writes it in input order, with the input's other columns kept,
to a temporary file beside `--output` that replaces it only once every row is scored: a failed
or stopped run (Ctrl-C, SIGTERM) leaves an existing output, and the input, as they were, and no
temporary file behind. Under `accelerate launch`, every process scores its share of each chunk
and the main process writes; texts from the command line or standard input are read by the main
process and shared. When the input carries labels, it reports accuracy, macro F1 and the
confusion matrix, and says which rows it left out and why.
"""

import contextlib
import json
import os
import select
import signal
import sys

import numpy as np
import polars as pl
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from .data import check_label_column, check_text_column, holds_labels, label_text
from .errors import SentimentError, n_rows
from .files import disk_full, disk_full_error, write_atomically
from .launcher import (free_the_group_at_the_end, outliving_their_readers, peer_gone, stop_signals,
                       stop_with_the_launcher)
from .metrics import classification_report
from .predictor import Predictor
from .tables import (SCANNERS, TableWriter, check_line_ends, check_writable_columns, existing_file, extension,
                     row_count, scan_chunks, scanner, tsv_names, unknown_type, where_broken, writable)

MAX_CONFUSION_SHOWN = 10  # classes whose confusion matrix is printed
PAUSE_S = 0.05  # standard input: lines that came are scored once no more come for this long
PREDICTED = "predicted_"  # before the added columns' names where the input has a column of one of them


def text_lines(lines, name, column, chunk_rows):
    """Frames of raw lines, each decoded as UTF-8 (a bad one is named, not replaced; a byte-order mark,
    which Windows editors put at the start of UTF-8 text, is dropped). A None among the lines (a pause,
    from `arriving_lines`) ends the frame under way."""
    chunk, number = [], 0
    for raw in lines:
        if raw is not None:
            number += 1
            try:
                chunk.append(raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                raise SentimentError(f"{name}: line {number} is not valid UTF-8; convert the text to UTF-8 "
                                     f"(e.g. iconv -f latin1 -t utf-8)") from None
        if chunk and (raw is None or len(chunk) == chunk_rows):
            yield pl.DataFrame({column: chunk}, schema={column: pl.String})
            chunk = []
    if chunk:
        yield pl.DataFrame({column: chunk}, schema={column: pl.String})


def arriving_lines(fd, pause_s=None):
    """The lines of file descriptor `fd` as they arrive; with `pause_s`, a None wherever none came for that
    long after a line: a pipe fed a line at a time (`tail -f`, a queue's consumer) or a terminal then gets
    each answer as it goes, not all of them at its end, while lines that come together are scored together.
    It reads the descriptor itself: a buffered reader can hold lines that `select` does not see, and
    fails on a descriptor that the program that started this one left non-blocking."""
    pieces, since_pause = [], False
    while True:
        if pause_s and since_pause and not select.select([fd], [], [], pause_s)[0]:
            yield None
            since_pause = False
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:  # non-blocking, and nothing there yet: wait until there is
            select.select([fd], [], [])
            continue
        if not data:
            break
        *ended, rest = data.split(b"\n")
        for line in ended:  # a line longer than one read comes in pieces: joined once, not re-copied per read
            yield b"".join([*pieces, line, b"\n"])
            pieces, since_pause = [], True
        if rest:
            pieces.append(rest)
    if pieces:
        yield b"".join(pieces)


def read_chunks(path, column, chunk_rows, as_they_come=False):
    """Frames of at most `chunk_rows` rows from a table, a text file or stdin ('-'); with `as_they_come`,
    stdin's lines are given as soon as no more are waiting (see `arriving_lines`)."""
    if path == "-":
        if sys.stdin.isatty():  # nothing piped in: say what it waits for rather than hang without a word
            print("reading texts from the terminal, one a line; end with Ctrl-D", file=sys.stderr)
        # Bytes, decoded line by line: under a C locale Python would turn bad bytes into lone surrogates.
        if os.name == "posix":
            lines = arriving_lines(sys.stdin.fileno(), PAUSE_S if as_they_come else None)
        else:  # no `select` on a pipe there: lines come in full chunks
            lines = sys.stdin.buffer
        yield from text_lines(lines, "standard input", column, chunk_rows)
    elif extension(path) == ".txt":
        try:
            with open(existing_file(path), "rb") as f:
                yield from text_lines(f, path, column, chunk_rows)
        except OSError as err:
            raise SentimentError(f"{path}: could not read it ({err.strerror})") from None
    else:
        yield from scan_chunks(path, chunk_rows)


def rows_in(path):
    """How many rows `read_chunks` will give, when a quick pass can tell (None for standard input)."""
    if path == "-":
        return None
    if extension(path) == ".txt":
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    return row_count(path)


def check_input(args):
    """The input's columns (an empty frame), once it is known to be there, of a type we read, and with the
    columns named: found before the model loads (seconds on a GPU). Every chunk has these columns."""
    path = args.input
    if path != "-":
        existing_file(path)
        if extension(path) != ".txt" and extension(path) not in SCANNERS:
            raise unknown_type(path, f".txt or one of {', '.join(SCANNERS)}")
        if extension(path) == ".txt":
            check_line_ends(path)  # a table's are checked as it is scanned
    try:
        columns = empty_input(path, args.text_column)
    except (pl.exceptions.PolarsError, OSError, ValueError) as err:
        raise SentimentError(f"{path}: could not read it: {where_broken(path, err)}") from None
    check_text_column(columns, path, args.text_column)
    label_column_of(args, columns)
    return columns


def scored_columns(frame, labels, answers, prefix=""):
    """The input frame with label, score, score_<label> and error columns added, each name after `prefix`."""
    columns = {"label": [a["label"] for a in answers], "score": [a["score"] for a in answers]}
    for name in labels:
        columns[f"score_{name}"] = [a["scores"][name] if a["scores"] else None for a in answers]
    columns["error"] = [a.get("error") for a in answers]
    return frame.with_columns(pl.Series(prefix + k, v, dtype=pl.Float64 if k.startswith("score") else pl.String)
                              for k, v in columns.items())


def added_columns_prefix(columns, labels, source):
    """'' when the input has none of the columns scoring adds; else PREDICTED, so that an input column
    such as a true `label` is kept, not overwritten with the predictions."""
    added = ["label", "score", *(f"score_{name}" for name in labels), "error"]
    clash = [name for name in added if name in columns]
    if not clash:
        return ""
    if any(PREDICTED + name in columns for name in added):
        raise SentimentError(f"{source} already has columns named as the scores (such as {clash[0]!r} and "
                             f"{PREDICTED + clash[0]!r}); rename them")
    print(f"{source} has a column named {clash[0]!r}: the scores go in {PREDICTED}label, {PREDICTED}score, … "
          f"and it is kept as it is", file=sys.stderr)
    return PREDICTED


def make_predictor(args, device):
    return Predictor(args.model, device=device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                     max_length=args.max_length, threads=args.threads, quantize=args.quantize,
                     precision=args.precision)


def print_answers(texts, answers):
    """One JSON line per text: the text, its label, score and every label's score (or its error). JSON
    lines are UTF-8 whatever the terminal's encoding: under a Latin-1 locale a Chinese review crashed."""
    if sys.stdout.encoding.lower().replace("-", "") != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    for text, answer in zip(texts, answers):
        print(json.dumps({"text": text, **answer}, ensure_ascii=False))
    sys.stdout.flush()  # a pipe's buffer would hold them until thousands more came


def empty_input(path, column):
    """A frame with no rows and the input's columns: a header-only file still gives a header."""
    schema = {column: pl.String} if path == "-" or extension(path) == ".txt" else scanner(path).collect_schema()
    return pl.DataFrame(schema=schema)


def shared_chunks(state, chunks):
    """`chunks` read by the main process alone and handed to every process, one broadcast per chunk:
    standard input can be read only once, and every process must make the same calls."""
    chunks = iter(chunks) if state.is_main_process else None
    while True:
        message = [next(chunks, None) if state.is_main_process else None]
        broadcast_object_list(message)
        if message[0] is None:
            return
        yield message[0]


class LabelTally:
    """Accuracy bookkeeping: which rows had a label the model knows, and why the others did not count."""

    def __init__(self, column, labels):
        self.column, self.index = column, {name: i for i, name in enumerate(labels)}
        self.y_true, self.y_pred, self.missing, self.unknown = [], [], 0, {}

    def add(self, frame, answers):
        """The input rows of a chunk (their true labels) and the Predictor's answers for them."""
        for value, answer in zip(label_text(frame[self.column]).to_list(), answers):
            if not value:  # spaces around a label are dropped, as in training
                self.missing += 1
            elif answer.get("error") is not None:
                continue
            elif value in self.index:
                self.y_true.append(self.index[value])
                self.y_pred.append(self.index[answer["label"]])
            else:
                self.unknown[value] = self.unknown.get(value, 0) + 1

    def report(self, labels):
        if self.missing:
            print(f"{n_rows(self.missing)} without a label in {self.column!r}, left out of the accuracy",
                  file=sys.stderr)
        if self.unknown:
            shown = ", ".join(f"{v!r} ({n})" for v, n in sorted(self.unknown.items())[:5])
            near = {label.lower() for label in labels} & {v.lower() for v in self.unknown}
            hint = "; some differ from them only in case" if near else ""
            print(f"{n_rows(sum(self.unknown.values()))} with labels the model does not know ({shown}), left out "
                  f"of the accuracy. The model's labels: {', '.join(labels)}{hint}", file=sys.stderr)
        if not self.y_true:
            print("no row has a label the model knows: no accuracy to report", file=sys.stderr)
            return None
        return classification_report(self.y_true, self.y_pred, labels)


def label_column_of(args, frame):
    column = args.label_column
    if (column is None and "sentiment" in frame.columns and args.text_column != "sentiment"
            and holds_labels(frame.schema["sentiment"])):  # a 'sentiment' of lists, say, is no label column
        column = "sentiment"
    if column and column not in frame.columns:
        raise SentimentError(f"{args.input}: no label column {column!r}; it has {', '.join(map(repr, frame.columns))}")
    if column:
        check_label_column(frame, args.input, column)
    if not column and args.metrics_out:  # found before any scoring, not after it
        raise SentimentError(f"--metrics-out needs true labels, and {args.input} has no label column ('sentiment', "
                             f"or one named with --label-column); it has {', '.join(map(repr, frame.columns))}")
    return column


def score_file(args, state, columns):
    """Score `args.input`, whose `columns` `check_input` gave, chunk by chunk; returns the label metrics, if
    the input had labels."""
    predictor = make_predictor(args, state.device if state.num_processes > 1 else args.device)
    # Printed answers come as stdin's lines do; a file output is whole only at the end, so it waits for full chunks.
    chunks = read_chunks(args.input, args.text_column, args.chunk_rows, as_they_come=not args.output)
    if state.num_processes > 1 and args.input == "-":
        chunks = shared_chunks(state, chunks)
    writes = args.output and state.is_main_process
    column, errors = label_column_of(args, columns), 0
    tally = LabelTally(column, predictor.labels) if column else None
    prefix = added_columns_prefix(columns.columns, predictor.labels, args.input) if writes else ""
    writer = TableWriter(args.output) if writes else None  # its file, made at the first write, goes in the `finally`
    # Made last before the `try`: one left open by a stop (a signal as the writer is made) is drawn at exit.
    bar = tqdm(desc="scoring", unit=" rows", disable=not writes, total=rows_in(args.input) if writes else None)
    try:
        for frame in chunks:
            answers = score_chunk(predictor, state, frame[args.text_column].cast(pl.String).to_list())
            if answers is None:  # not the main process
                continue
            errors += sum(answer.get("error") is not None for answer in answers)
            if tally:
                tally.add(frame, answers)
            if writer:
                writer.write(scored_columns(frame, predictor.labels, answers, prefix))
            else:
                print_answers(frame[args.text_column].to_list(), answers)
            bar.update(len(frame))
        if writer and writer.count == 0:
            writer.write(scored_columns(columns, predictor.labels, [], prefix))
        if writer:
            writer.close()
    finally:
        bar.close()
        if writer:
            writer.abort()  # after close() there is nothing left to remove
    if state.is_main_process and errors:
        print(f"{n_rows(errors)} with nothing to score; the '{prefix}error' column says why", file=sys.stderr)
    return tally.report(predictor.labels) if tally and state.is_main_process else None


def score_chunk(predictor, state, texts):
    """The answers for `texts` (on the main process; None elsewhere), each process scoring its share."""
    with state.split_between_processes(list(range(len(texts)))) as mine:
        probs = predictor.probabilities([texts[i] for i in mine])
    if state.num_processes > 1:
        probs = np.concatenate([p for p in gather_object([probs]) if len(p)] or [probs])
    return [predictor.answer(p) for p in probs] if state.is_main_process else None


def score_texts(args, state):
    """Texts given on the command line: scored once, printed once."""
    if state.is_main_process:
        print_answers(args.texts, make_predictor(args, args.device).predict(args.texts))


@contextlib.contextmanager
def stopped_by_signals(output):
    """Ctrl-C, SIGTERM and a closed terminal's SIGHUP unwind the run, so its `finally` blocks remove the
    unfinished output (by default SIGTERM and SIGHUP end the process on the spot and leave it), then exit
    130, 143 or 129 with one line (where anything still reads it)."""
    stops, received = stop_signals(), []

    def stop(signum, frame):
        for repeat in stops:  # a repeat, or the launcher's death, must not cut the removal of the output short
            signal.signal(repeat, signal.SIG_IGN)
        received.append(signum)
        raise KeyboardInterrupt(signum)

    previous = {signum: signal.signal(signum, stop) for signum in stops}
    try:
        stop_with_the_launcher()
        yield
    except Exception:
        # Native code that calls back into Python may swallow the KeyboardInterrupt and raise its own error:
        # polars' reported "TypeError: '<unprintable str object>' is not a Polars data type". Asked to stop,
        # the run stops as asked, whatever the stop's exception became.
        if not received:
            raise
        stopped(received[0], output)
    except KeyboardInterrupt as err:
        stopped(err.args[0] if err.args else signal.SIGINT, output)  # one not raised by `stop`: Ctrl-C
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stopped(signum, output):
    """Say that `signum` stopped the run, its `output` as it was, and exit 128 + signum."""
    kept = f"; {output} is as it was" if output else ""
    if os.environ.get("RANK", "0") == "0":  # said once, not by every process of `accelerate launch`
        print(f"stopped by {signal.Signals(signum).name}{kept}", file=sys.stderr)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        leave_the_group_now(128 + signum)
    raise SystemExit(128 + signum) from None


def leave_the_group_now(status):
    """Exit a stopped multi-process run, its output already removed, without shutting the interpreter down.
    Its process group must not outlive the interpreter (a gloo thread then aborts the process), yet destroying
    it may wait on a peer that left mid-collective; ending the process ends its threads with it."""
    for stream in filter(None, (sys.stdout, sys.stderr)):  # None: closed by the shell (`>&-`)
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more to say there
            stream.flush()
    os._exit(status)


def run(args):
    # Standard error's reader, gone (a closed terminal, a `| tee` that Ctrl-C ended), must not end a run whose
    # stop removes its unfinished output; standard output's is the answers' reader: its going ends the run.
    with outliving_their_readers("stderr"), stopped_by_signals(args.output):
        try:
            score_and_report(args)
        except BrokenPipeError:  # `infer.py … | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit fails again
            raise SystemExit(128 + signal.SIGPIPE) from None  # as a tool that SIGPIPE ended
        except Exception as err:
            if gone := peer_gone(err):
                raise gone from None
            if not disk_full(err):
                raise
            where = os.path.dirname(os.path.abspath(args.output or args.metrics_out or "."))
            raise disk_full_error(where, err, "run again (an existing output is as it was)") from None


def score_and_report(args):
    # Several CPU processes (`accelerate launch` without a GPU) talk over gloo.
    free_the_group_at_the_end()
    state = PartialState(cpu=int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available())
    # A stream the shell closed (`<&-`, `>&-`) is None to Python.
    if args.input == "-" and sys.stdin is None:
        raise SentimentError("--input -: standard input is closed; pipe the texts in (some_command | infer.py "
                             "--input -) or name a file")
    if not args.output and sys.stdout is None:
        raise SentimentError("standard output is closed, so the answers cannot be printed; write them to a file "
                             "with --output FILE")
    columns = check_input(args) if args.input else None
    for path, flag in ((args.output, "--output"), (args.metrics_out, "--metrics-out")):
        if path:
            writable(path, flag, source=args.input, model=args.model)
    if args.output and extension(args.output) not in SCANNERS:
        raise SentimentError(f"--output {args.output}: unknown file type; use one of {', '.join(SCANNERS)} (without "
                             f"--output, the rows go to standard output as JSON lines)")
    if args.output and columns is not None:  # refused before the model loads
        check_writable_columns(columns, args.output)
        if extension(args.output) == ".tsv":
            tsv_names(columns.columns)  # two names that would be one in its header
    if args.output and args.metrics_out and os.path.abspath(args.output) == os.path.abspath(args.metrics_out):
        raise SentimentError(f"--output and --metrics-out are both {args.output}; name two files")
    report = score_texts(args, state) if args.texts else score_file(args, state, columns)
    if state.num_processes > 1:  # leave together, or gloo's threads abort the process that leaves first
        state.wait_for_everyone()
        state.destroy_process_group()
    if report:
        confusion = report["confusion_matrix"]
        shown = (f"confusion (rows true, columns predicted, {confusion['labels']}): "
                 f"{confusion['rows_true_columns_predicted']}" if len(confusion["labels"]) <= MAX_CONFUSION_SHOWN
                 else "the confusion matrix is written by --metrics-out")  # a line of a million counts otherwise
        print(f"accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f} on {n_rows(report['examples'])}; "
              f"{shown}", file=sys.stderr)
        if args.metrics_out:
            write_atomically(args.metrics_out, json.dumps(report, indent=2))
    elif args.metrics_out and state.is_main_process:  # no row had a label the model knows (said above)
        raise SentimentError(f"--metrics-out {args.metrics_out} not written: no row has a label the model knows")
