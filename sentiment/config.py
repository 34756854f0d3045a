"""Typed settings for each job: training and scoring flags, and the service's environment.

`TrainArgs` holds every hyperparameter of a training run, with a one-line help per field and
checks in `__post_init__`. `parse_args` builds an argparse parser whose flags map one-to-one
onto a dataclass's fields (`max_length` is `--max-length`), so the flags, their help and the
saved `train_config.json` cannot drift apart. `ServeSettings` reads `SENTIMENT_*` variables the
same way. An unset optional setting is `None` everywhere. The settings' vocabulary (the lists of
choices, the shortest max length, the default batch limits) and the model folder's file names
are defined here and imported by the modules that act on them, so that parsing flags and
rebuilding a report need neither torch nor transformers: `--help` and a mistyped flag answer at
once. Nothing here reads data or touches a model.
"""

import argparse
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field

from .errors import SentimentError, flag, warn

try:
    import resource
except ImportError:  # Windows: no open-file limit to read
    resource = None

TRUNCATIONS = ("head", "tail", "head+tail")  # which tokens of a long text to keep (batching.truncate)
MIN_LENGTH = 8  # the shortest max length: a text keeps a few tokens beside the special ones
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # training, through Accelerate
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # scoring: auto is bf16 where the hardware has it; fp16: GPUs only
MAX_COUNT = 2**32 - 1  # the largest whole-number flag (--seed's largest too)
MAX_CONNECTIONS = 4096  # the service's open connections at most, unless set
FILES_KEPT = 64  # file descriptors the service keeps beside its connections (it uses about 10 once the model is in)
# The Predictor's default batch limits, texts and tokens (texts × padded length) per forward pass.
# Measured with bench/infer.py: on a CPU, batches of 16 (4k tokens) stay in cache and beat larger
# ones by a quarter; a GPU wants large batches.
CPU_BATCH_SIZE, CPU_BATCH_TOKENS = 16, 4096
GPU_BATCH_SIZE, GPU_BATCH_TOKENS = 64, 32768

# The files of the model folder, named once: training writes them, inference and reports read them.
SETTINGS_FILE = "sentiment.json"  # ModelSettings
WEIGHTS_FILE = "model.safetensors"  # written by save_pretrained
CONFIG_FILE = "train_config.json"  # every setting of the run (also in each checkpoint)
METRICS_FILE = "metrics.json"  # the run's final figures
LOG_FILE = "log.jsonl"  # one line per logged step and per evaluation
STATE_FILE = "trainer_state.json"  # where a checkpoint's loop stands (checkpointing.TrainState)
# Present while train.py swaps a new model in, file by file (outputs.publish_model): until it is gone
# the folder may hold old and new files mixed. It names the writer: host and process id.
PUBLISHING_FILE = ".publishing"
# A folder needs one of these for AutoTokenizer to read a vocabulary: without any, transformers
# builds a tokenizer of special tokens alone that turns every word into [UNK], without a word.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# Files a Hugging Face model folder may hold (sharded weights aside).
MODEL_FILES = {"config.json", WEIGHTS_FILE, "model.safetensors.index.json", "pytorch_model.bin",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
               "chat_template.jinja", SETTINGS_FILE}


def arg(default, help, **kwargs):
    """A dataclass field that also carries its command-line help (and choices, if any)."""
    return field(default=default, metadata={"help": help, **kwargs})


def fixed(default, help, **kwargs):
    """An `arg` that a resumed run must keep as its checkpoint saved it: it fixes the data split,
    the batch order, the learning-rate schedule or the model's shape."""
    return arg(default, help, invariant=True, **kwargs)


def invariants(cls):
    """Names of the fields of `cls` made with `fixed`."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("invariant")]


@dataclass
class TrainArgs:
    # Fields made with `fixed()` are the run's invariants: `--resume` refuses a change to them.
    # data
    data: str = fixed(None, "Training table (CSV, TSV, Parquet, JSON lines), 'imdb' to download the IMDb "
                            "reviews from the Hugging Face Hub, or 'demo' for built-in generated reviews.")
    val_data: str = fixed(None, "Validation table; default: carve --val-size rows out of --data.")
    test_data: str = fixed(None, "Test table; default: carve --test-size rows out of --data.")
    val_size: float = fixed(0.1, "Validation rows taken from --data: a fraction (<1) or a count. 0 = none.")
    test_size: float = fixed(0.1, "Test rows taken from --data: a fraction (<1) or a count. 0 = none.")
    text_column: str = fixed("review", "Column holding the text.")
    label_column: str = fixed("sentiment", "Column holding the label (any strings; two or more classes).")
    skip_bad_rows: bool = fixed(False, "Drop rows with a missing or empty text or label instead of stopping.")
    normalize_labels: bool = fixed(False, "Merge labels that differ only in case ('Positive', 'positive') into one "
                                          "class, lower-cased; without it they stay apart, with a warning.")
    # model
    model: str = fixed("distilbert-base-uncased", "Hub id or local folder of a pretrained model, or 'tiny' for a "
                                                  "small random model with a tokenizer trained on the data.")
    output_dir: str = arg("outputs/model", "Where the model folder, metrics and checkpoints go.")
    overwrite: bool = arg(False, "Replace the training run in a non-empty --output-dir (a folder of other files is "
                                 "refused).")
    max_length: int = fixed(512, "Longest input in tokens, special tokens included (at most the model's "
                                 "position limit, 512 for BERT and DistilBERT).")
    truncation: str = fixed("head+tail", "Which tokens of a long text to keep: the first, the last, or the first "
                                         "quarter and the last three quarters (Sun et al., 2019).",
                            choices=TRUNCATIONS)
    # optimisation
    epochs: int = fixed(2, "Passes over the training rows.")
    batch_size: int = fixed(16, "Examples per batch on each device.")
    grad_accum: int = fixed(1, "Batches whose gradients are summed before each optimizer step.")
    lr: float = fixed(2e-5, "Peak learning rate of AdamW.")
    weight_decay: float = fixed(0.01, "AdamW weight decay (never applied to biases and LayerNorm weights).")
    warmup_ratio: float = fixed(0.1, "Fraction of the optimizer steps spent warming the learning rate up from 0.")
    max_grad_norm: float = fixed(1.0, "Clip the gradient norm to this; 0 turns clipping off.")
    class_weights: str = fixed("none", "auto: weigh each class's loss by its inverse frequency in the training rows "
                                       "(for skewed labels; the weights go into train_config.json); none: equal.",
                               choices=("none", "auto"))
    mixed_precision: str = arg(None, "no, fp16 or bf16; default: what `accelerate launch` was configured with.",
                               choices=MIXED_PRECISIONS)
    seed: int = fixed(42, "Seed for the data split, the shuffling, the new head's weights and dropout.")
    attention_dropout: float = fixed(None, "Dropout on the attention weights; default: the model's own (0.1 for "
                                           "BERT and DistilBERT). 0 lets PyTorch's fused attention run on CPUs, "
                                           "which trains twice as fast at --max-length 512 (see BENCHMARKS.md).")
    max_steps: int = fixed(None, "Stop after this many optimizer steps (for quick runs); default: all epochs.")
    cuda_graphs: bool = arg(False, "Replay each training step as a CUDA graph, one per batch shape (batches padded "
                                   "to a multiple of 64 tokens): the host no longer queues every kernel of a step. "
                                   "One GPU, bf16 or no mixed precision, --grad-accum 1; memory for the graphs "
                                   "besides the eager steps'.")
    # bookkeeping
    eval_every: int = arg(None, "Also evaluate every N optimizer steps; evaluation always runs each epoch.")
    early_stopping_patience: int = arg(None, "Stop after N evaluations in a row without a better validation "
                                             "accuracy, keeping the best model; default: never stop early.")
    checkpoint_every: int = arg(500, "Save the full training state every N optimizer steps; 0 = never.")
    keep_checkpoints: int = arg(2, "How many of the newest checkpoints to keep.")
    resume: str = arg(None, "'latest' to continue from the newest checkpoint in --output-dir, or a checkpoint path.")
    report_to: str = arg(None, "Also log to this tracker through Accelerate (e.g. tensorboard), if installed.")

    def __post_init__(self):
        refuse_empty(self)
        if not self.data:
            raise SentimentError("--data is required: a table file, 'imdb' or 'demo'")
        refuse_names_not_utf8(self)
        refuse_one_column_for_both(self.text_column, self.label_column)
        for name in ("val_data", "test_data"):  # its rows would all be taken out of the training rows
            if getattr(self, name) and same_file(getattr(self, name), self.data):
                raise SentimentError(f"{flag(name)} is the --data file, {self.data}; held-out rows must be other "
                                     f"rows (leave {flag(name)} out to carve them from --data)")
        if self.val_data and self.test_data and same_file(self.val_data, self.test_data):
            raise SentimentError(f"--val-data and --test-data are both {self.val_data}; the best model is chosen on "
                                 f"the validation rows, so the test rows must be other rows for the test accuracy to "
                                 f"say how it does on new data")
        for f in dataclasses.fields(self):  # argparse's float() takes 'nan' and 'inf'
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise SentimentError(f"{flag(f.name)} must be a finite number, got {getattr(self, f.name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise SentimentError(f"{flag(name)} must be 0 or more, got {getattr(self, name)}")
        if self.lr * self.weight_decay >= 1:  # AdamW takes that share of every weight each step: the run diverged
            raise SentimentError(f"--weight-decay {self.weight_decay:g} with --lr {self.lr:g}: AdamW takes --lr × "
                                 f"--weight-decay ({self.lr * self.weight_decay:g}) of every weight at each step, "
                                 f"which must be well below 1; a usual --weight-decay is 0.01")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise SentimentError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_length < MIN_LENGTH:
            raise SentimentError(f"--max-length must be at least {MIN_LENGTH} tokens, got {self.max_length}")
        for name in ("val_size", "test_size"):
            value = getattr(self, name)
            if value < 0 or (value >= 1 and value != int(value)):
                raise SentimentError(f"{flag(name)} must be a fraction below 1 or a whole count, "
                                     f"got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise SentimentError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise SentimentError(f"--lr must be positive, got {self.lr}")
        if self.attention_dropout is not None and not 0 <= self.attention_dropout < 1:
            raise SentimentError(f"--attention-dropout must be in [0, 1), got {self.attention_dropout}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SentimentError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise SentimentError(f"--early-stopping-patience must be at least 1, got {self.early_stopping_patience}")
        if self.early_stopping_patience and self.val_size == 0 and not self.val_data:
            raise SentimentError("--early-stopping-patience watches the validation accuracy, but --val-size is 0 and "
                                 "there is no --val-data; keep some validation rows or drop the flag")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SentimentError(f"{flag(name)} must be 0 or more, got {value}")
        if not 0 <= self.seed < 2**32:  # numpy's seeding takes no other (a traceback, after the data was read)
            raise SentimentError(f"--seed must be from 0 to {2**32 - 1}, got {self.seed}")
        refuse_huge_counts(self)


def refuse_empty(args, named=flag, error=SentimentError):
    """Refuse a setting given as an empty string, as an unset shell variable gives it (`--model "$MODEL"`):
    it was taken for a Hub id, a model folder named '', a column named '' or, for --output, none at all."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, str) and not value.strip():
            raise error(f"{named(f.name)} is empty (an unset shell variable?); give it a value")


def refuse_names_not_utf8(args, setting=lambda name, value: f"{flag(name)} {value}", error=SentimentError):
    """Refuse a setting that is not valid UTF-8 (a file name in Latin-1, say, which reaches Python as lone
    surrogates): polars, tokenizers and transformers take UTF-8 names alone, and failed with a traceback,
    after training steps for an --output-dir. `setting(name, value)` shows it as it was given."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise error(f"{setting(f.name, shown)}: not valid UTF-8 (a name in another encoding, such as "
                            f"Latin-1), which the libraries that read tables and models cannot take; give it in "
                            f"UTF-8 (convmv -f latin1 -t utf8 --notest NAME renames a file)") from None


def refuse_huge_counts(args):
    """Refuse a whole-number flag over `MAX_COUNT`: no count a run can use comes near it, and larger ones
    overflowed C integers deep in the libraries (--batch-size 2**63 ended in a traceback from islice)."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if type(value) is int and value > MAX_COUNT:
            raise SentimentError(f"{flag(f.name)} must be at most {MAX_COUNT:,}, got {value}")


def refuse_one_column_for_both(text_column, label_column):
    if text_column == label_column:
        raise SentimentError(f"--text-column and --label-column are both {text_column!r}; name the column of texts "
                             f"and the column of labels")


def same_file(a, b):
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with the flag's default, unless there is none to show (None, [], a switch) or the
    help already says what it is."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or "default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser(cls, description):
    """An argparse parser with one `--flag` per field of the dataclass `cls`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelp)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", default=[], help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(flag(f.name), action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag(f.name), type=kind, default=f.default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    return parser


def parse_args(cls, description, argv=None):
    """Parse the command line into an instance of the dataclass `cls`."""
    namespace = build_parser(cls, description).parse_args(argv)
    return cls(**vars(namespace))


@dataclass
class InferArgs:
    texts: list = arg(None, "Texts to score, each one argument (or use --input).", positional=True)
    model: str = arg("outputs/model", "Model folder written by train.py, or any Hugging Face "
                                      "sequence-classification folder.")
    input: str = arg(None, "Table to score (CSV, TSV, Parquet, JSON lines) or plain text with one review per "
                           "line (.txt); '-' reads lines from stdin.")
    output: str = arg(None, "Write the scored rows here (format by extension); default: JSON lines on stdout.")
    text_column: str = arg("review", "Column of --input holding the text.")
    label_column: str = arg(None, "Column of --input holding true labels, to report accuracy; "
                                  "default: 'sentiment' when the input has it.")
    metrics_out: str = arg(None, "Also write accuracy, macro F1 and the confusion matrix to this JSON file.")
    batch_size: int = arg(None, f"Most texts in one forward pass; default: {CPU_BATCH_SIZE} on a CPU, "
                                f"{GPU_BATCH_SIZE} on a GPU.")
    max_batch_tokens: int = arg(None, f"Most tokens (texts × padded length) in one forward pass; "
                                      f"default: {CPU_BATCH_TOKENS} on a CPU, {GPU_BATCH_TOKENS} on a GPU.")
    max_length: int = arg(None, "Truncate texts to this many tokens; default: what training used.")
    device: str = arg("auto", "cpu, cuda, cuda:1, …; auto picks a GPU when there is one.")
    threads: int = arg(None, "CPU threads for the model; default: PyTorch's choice (one per core).")
    quantize: str = arg(None, "int8: dynamic int8 quantisation of the linear layers (CPU only).", choices=("int8",))
    precision: str = arg("auto", "auto: bf16 where the hardware has it (a GPU of compute capability 8+; a CPU "
                                 "with AVX512-BF16 or AMX), else fp32. fp16: GPUs without bf16 (V100, T4).",
                         choices=PRECISIONS)
    chunk_rows: int = arg(10000, "Rows read, scored and written at a time; bounds memory on large files.")

    def __post_init__(self):
        refuse_empty(self)
        if not self.texts and not self.input:
            raise SentimentError("nothing to score: give texts as arguments, --input FILE, or --input - to read "
                                 "them from standard input")
        if self.texts and self.input:
            raise SentimentError(f"texts as arguments and --input {self.input} both: give one or the other")
        if self.texts and self.metrics_out:
            raise SentimentError("--metrics-out needs true labels, from a label column of an --input file; texts on "
                                 "the command line have none")
        refuse_names_not_utf8(self)
        refuse_one_column_for_both(self.text_column, self.label_column)
        for number, text in enumerate(self.texts or [], 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
                raise SentimentError(f"text {number} on the command line is not valid UTF-8") from None
        refuse_huge_counts(self)
        for name in ("batch_size", "max_batch_tokens", "chunk_rows", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SentimentError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")


def open_file_limit():
    """The process's open-file limit (`ulimit -n`), or None where it has none."""
    if resource is None:
        return None
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def misspelt_settings(environ, names):
    """(variable, setting) for each SENTIMENT_ variable of `environ` that is not one of the settings `names` but
    looks like one (SENTIMENT_MAX_BATCH_SZE): ignored, it would leave a limit meant to be set at its default
    without a word. Others of the prefix (predict_sentiment.sh's SENTIMENT_URL) are left alone."""
    short = {name.removeprefix("SENTIMENT_"): name for name in names}
    for name in sorted(environ):
        if name.startswith("SENTIMENT_") and name not in names:
            close = difflib.get_close_matches(name.removeprefix("SENTIMENT_"), short, n=1, cutoff=0.75)
            if close:
                yield name, short[close[0]]


@dataclass
class ServeSettings:
    """The service's settings, each read from `SENTIMENT_<NAME>` (`max_wait_ms` from SENTIMENT_MAX_WAIT_MS)."""

    model: str = "outputs/model"  # the model folder
    # One model call is one forward pass; unset takes the Predictor's own limits (CPU_BATCH_SIZE and
    # CPU_BATCH_TOKENS on a CPU, where larger batches are no faster per text; the GPU_ ones on a GPU).
    max_batch_size: typing.Optional[int] = None  # most texts per model call
    max_batch_tokens: typing.Optional[int] = None  # most tokens per model call
    max_wait_ms: float = 5.0  # longest wait for a batch to fill, under load
    queue_size: int = 256  # texts waiting at most; beyond it, 503 at once
    # Texts one client (one address) keeps of a full queue that other clients need: beyond it, its newest
    # requests are pushed out (503) to make room for theirs. Unset: half the queue, and at least max_texts.
    queue_size_per_client: typing.Optional[int] = None
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    # Bytes of bodies held while they arrive and are parsed, all requests together; beyond it, 503
    # at once: many slow large bodies must not take the memory every request needs.
    max_body_bytes_total: int = 64 << 20
    # The part of it one client (one address) may hold; unset: half of it, and at least max_body_bytes.
    max_body_bytes_per_client: typing.Optional[int] = None
    max_texts: int = 64  # most texts in one request
    # Connections open at most (each holds a file descriptor); beyond it, a new one is closed at once.
    # Unset: what the open-file limit (`ulimit -n`) leaves beside the service's own files, at most 4096.
    max_connections: typing.Optional[int] = None
    # Connections one client (one address) may hold open; unset: half of max_connections. A proxy
    # uvicorn takes client addresses from (--forwarded-allow-ips, by default this host) counts only in all.
    max_connections_per_client: typing.Optional[int] = None
    max_chars: int = 20000  # longest text accepted
    request_timeout_s: float = 30.0  # then 504
    body_timeout_s: float = 10.0  # the whole body must arrive within this; then 408
    head_timeout_s: float = 10.0  # the request line and headers must arrive within this (`--http app:HTTP`)
    # A client that takes nothing of a waiting answer (what its socket would not take) for this long is cut
    # (`--http app:HTTP`): one that reads no answer holds nothing for long.
    send_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0  # a model call running longer makes /health and /ready answer 503 (a hung GPU)
    device: str = "auto"  # cpu, cuda, cuda:1, …
    threads: typing.Optional[int] = None  # CPU threads for the model; unset: PyTorch's choice
    precision: str = "auto"  # auto, fp32, bf16 (on a CPU: AVX512-BF16 or AMX) or fp16 (GPUs without bf16)

    def client_share(self, name, whole, least=None):
        """Setting `name`, what one client may take of setting `whole`: half of it where unset, and
        never less than setting `least` (one request's worth; 1 where None) nor more than the whole."""
        share, whole_value = getattr(self, name), getattr(self, whole)
        least_value = getattr(self, least) if least else 1
        least_text = f"SENTIMENT_{least.upper()} ({least_value})" if least else str(least_value)
        if share is None:
            share = max(whole_value // 2, least_value)
        if not least_value <= share <= whole_value:
            raise ValueError(f"SENTIMENT_{name.upper()} must be at least {least_text} "
                             f"and at most SENTIMENT_{whole.upper()} ({whole_value}), got {share}")
        return share

    @classmethod
    def from_env(cls, environ=os.environ):
        values, hints = {}, typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = environ.get(f"SENTIMENT_{f.name.upper()}")
            if raw is None:
                continue
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            try:
                values[f.name] = kind(raw)
            except ValueError:
                what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
                raise ValueError(f"SENTIMENT_{f.name.upper()}={raw!r} is not {what}") from None
        for name, meant in misspelt_settings(environ, [f"SENTIMENT_{f.name.upper()}" for f in dataclasses.fields(cls)]):
            warn(f"{name} is not a setting of the service, and is ignored; did you mean {meant}?")
        return cls(**values)

    def __post_init__(self):
        refuse_empty(self, lambda name: f"SENTIMENT_{name.upper()}", ValueError)
        refuse_names_not_utf8(self, lambda name, value: f"SENTIMENT_{name.upper()}={value}", ValueError)
        for name in ("queue_size", "queue_size_per_client", "max_body_bytes", "max_body_bytes_total",
                     "max_body_bytes_per_client", "max_texts", "max_chars", "request_timeout_s", "body_timeout_s",
                     "head_timeout_s", "send_timeout_s", "stall_timeout_s", "max_batch_size", "max_batch_tokens",
                     "threads", "max_connections", "max_connections_per_client"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # `not >` also refuses NaN
                raise ValueError(f"SENTIMENT_{name.upper()} must be above 0, got {value}")
        if self.max_body_bytes_total < self.max_body_bytes:
            raise ValueError(f"SENTIMENT_MAX_BODY_BYTES_TOTAL must be at least SENTIMENT_MAX_BODY_BYTES "
                             f"({self.max_body_bytes}), got {self.max_body_bytes_total}")
        if self.queue_size < self.max_texts:  # a request of max_texts texts could never be queued
            raise ValueError(f"SENTIMENT_QUEUE_SIZE must be at least SENTIMENT_MAX_TEXTS ({self.max_texts}), "
                             f"got {self.queue_size}")
        self.max_body_bytes_per_client = self.client_share("max_body_bytes_per_client", "max_body_bytes_total",
                                                           "max_body_bytes")
        self.queue_size_per_client = self.client_share("queue_size_per_client", "queue_size", "max_texts")
        limit = open_file_limit()
        room = math.inf if limit is None else limit - FILES_KEPT  # connections the descriptors left allow
        if room < 1:
            raise ValueError(f"the open-file limit (ulimit -n) of {limit} leaves no room for connections beside "
                             f"the {FILES_KEPT} files the service keeps for itself: raise it")
        if self.max_connections is None:
            self.max_connections = min(MAX_CONNECTIONS, room)
        if self.max_connections > room:
            raise ValueError(f"SENTIMENT_MAX_CONNECTIONS must be at most {room}, what the open-file limit "
                             f"(ulimit -n) of {limit} leaves beside the {FILES_KEPT} files the service keeps "
                             f"for itself, got {self.max_connections}: lower it or raise the limit")
        self.max_connections_per_client = self.client_share("max_connections_per_client", "max_connections")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"SENTIMENT_MAX_WAIT_MS must not be negative, got {self.max_wait_ms}")
        for name in ("max_wait_ms", "request_timeout_s", "body_timeout_s", "head_timeout_s", "send_timeout_s",
                     "stall_timeout_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"SENTIMENT_{name.upper()} must be a finite number, got {getattr(self, name)}")
        if self.max_wait_ms >= self.request_timeout_s * 1000:  # batches would wait for texts past every deadline
            raise ValueError(f"SENTIMENT_MAX_WAIT_MS must be below SENTIMENT_REQUEST_TIMEOUT_S "
                             f"({self.request_timeout_s:g} s), got {self.max_wait_ms:g} ms")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SENTIMENT_PRECISION must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
