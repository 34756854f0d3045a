"""Models and tokenizers: load a pretrained one, build a tiny one, and read or write the model folder.

The model folder is the contract between training and everything after it: a standard Hugging
Face folder (`config.json` with the label names, `model.safetensors`, tokenizer files) plus
`sentiment.json`, our settings (`ModelSettings`: labels, max length, truncation, calibration).
`load_model_folder` rebuilds everything inference needs from that folder alone.
"""

import contextlib
import glob
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, fields

import tokenizers
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DistilBertConfig

from .config import (CONFIG_FILE, MIN_LENGTH, MODEL_FILES, PUBLISHING_FILE, SETTINGS_FILE, STATE_FILE, TOKENIZER_FILES,
                     TRUNCATIONS)
from .errors import SentimentError, SettingError, warn
from .files import as_plain_files, did_you_mean, process_alive
from .hub import download_options, offline_note

TINY_VOCAB = 1000


@dataclass
class ModelSettings:
    labels: list  # class names; class i of the model is labels[i]
    max_length: int = 512  # tokens, special tokens included
    truncation: str = "head"  # which tokens of a long text to keep (see batching.truncate)
    temperature: float = 1.0  # logits are divided by it before the softmax (fitted on validation)
    clean: bool = True  # strip markup and fold spaces as training did (data.clean_texts); off for foreign folders

    def save(self, folder):
        with open(os.path.join(folder, SETTINGS_FILE), "w") as f:
            json.dump(asdict(self), f, indent=2)

    def problems(self, num_labels):
        """What is wrong with settings read from a file, for a model of `num_labels` classes."""
        found = []
        if not (isinstance(self.labels, list) and all(isinstance(x, str) for x in self.labels)
                and len(set(self.labels)) == len(self.labels) == num_labels):  # one name per class: answers key by name
            found.append(f"labels must be a list of {num_labels} different names, as the model has {num_labels} "
                         f"classes")
        if not (is_number(self.max_length, int) and self.max_length >= MIN_LENGTH):
            found.append(f"max_length must be a whole number of tokens, at least {MIN_LENGTH}")
        if self.truncation not in TRUNCATIONS:
            found.append(f"truncation must be one of {', '.join(TRUNCATIONS)}")
        if not (is_number(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            found.append("temperature must be a finite number above 0")
        if not isinstance(self.clean, bool):
            found.append("clean must be true or false")
        return found


def is_number(value, types):
    return isinstance(value, types) and not isinstance(value, bool)  # JSON's true is not 1


def label_maps(labels):
    return {i: name for i, name in enumerate(labels)}, {name: i for i, name in enumerate(labels)}


def train_tiny_tokenizer(texts, vocab_size=TINY_VOCAB):
    """A lowercasing WordPiece tokenizer with BERT's special tokens, built from `texts`.

    The vocabulary is every character seen (alone and as a `##` continuation), then the most
    frequent words. Ties are broken alphabetically, so every process and every run builds the
    same vocabulary from the same texts (the `tokenizers` trainer breaks ties in hash order).
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(word for text in texts
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    vocab = special + chars + ["##" + c for c in chars]
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += ranked[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def tiny_config(vocab_size, labels):
    """A 2-layer DistilBERT with hidden size 32: trains in seconds on a CPU."""
    id2label, label2id = label_maps(labels)
    return DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                            max_position_embeddings=512, num_labels=len(labels), id2label=id2label,
                            label2id=label2id)


def load_tokenizer(name, train_texts):
    """The fast tokenizer of a local folder or Hub id, or for 'tiny' a new one trained on `train_texts`
    (the same in every process: see `train_tiny_tokenizer`)."""
    if name == "tiny":
        return train_tiny_tokenizer(train_texts)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):  # a run's checkpoint or folder has a tokenizer too
            raise SentimentError(f"--model {name}: not a model folder (no config.json){what_it_is(name)}")
        if publication(name) is PUBLISHING:
            raise SentimentError(f"--model {name}: a training run is moving a new model into this folder; try "
                                 f"again when it has finished")
        tokenizer = folder_tokenizer(name)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **download_options(name))
        except OSError as err:
            raise model_error(name, err) from None
    if not tokenizer.is_fast:
        raise SentimentError(f"--model {name}: its tokenizer has no fast (Rust) version, which batching needs")
    return tokenizer


# What each architecture calls the dropout on attention weights.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def load_model(name, labels, vocab_size, attention_dropout=None):
    """A model with a fresh classification head for `labels`: 'tiny', a local folder or a Hub id.

    Call it after seeding, so the seed also fixes the new head's initial weights. The weights are
    fp32 whatever the folder was saved in: mixed precision wants fp32 master weights.
    """
    id2label, label2id = label_maps(labels)
    if os.path.isfile(os.path.join(name, "config.json")):
        check_label_count(name)
    try:
        config = (tiny_config(vocab_size, labels) if name == "tiny" else AutoConfig.from_pretrained(
            name, id2label=id2label, label2id=label2id, **download_options(name)))  # the labels' count with them
    except (OSError, ValueError) as err:  # ValueError: a config.json without a model_type transformers knows
        raise model_error(name, err) from None
    # Trained with cross-entropy: a softmax over the labels. Said in the config, since a base checkpoint's
    # own (multi-label, regression) would have the pipeline and the Predictor score it otherwise.
    config.problem_type = "single_label_classification"
    if attention_dropout is not None:
        key = next((k for k in ATTENTION_DROPOUT_KEYS if hasattr(config, k)), None)
        if key is None:
            raise SettingError("attention_dropout", f"{config.model_type} models have no attention dropout to set")
        setattr(config, key, attention_dropout)
    if name == "tiny":
        return AutoModelForSequenceClassification.from_config(config)
    model, found = AutoModelForSequenceClassification.from_pretrained(
        name, config=config, ignore_mismatched_sizes=True, dtype=torch.float32, output_loading_info=True,
        **download_options(name))
    # The new head starts at random; a weight of the pretrained body that the files lack does too, silently.
    body = sorted(key for key in found["missing_keys"] if key.startswith(model.base_model_prefix + "."))
    if body:
        warn(f"{name}: its weights file lacks {len(body)} of the model's pretrained weights ({', '.join(body[:3])}"
             f"{', …' if len(body) > 3 else ''}); they start at random, so the run learns them from nothing. Is it "
             f"the model meant?")
    return model


def grow_embeddings(model, vocab_size):
    """Give `model` an embedding for every one of `vocab_size` token ids: tokens added to a tokenizer
    without resizing its model have ids past the model's embeddings (an IndexError on a CPU, a
    device-side assert that stops every later CUDA call on a GPU). Their new rows are learnt in
    training. Returns how many were added."""
    have = model.get_input_embeddings().num_embeddings
    if have < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return max(vocab_size - have, 0)


def check_embeddings(folder, model, tokenizer):
    """Refuse a model folder whose tokenizer makes token ids its model has no embedding for."""
    have = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > have:
        raise SentimentError(f"{folder}: its tokenizer has {len(tokenizer)} tokens and its model embeddings for "
                             f"{have} of them (tokens added to the tokenizer alone), so a text with any other "
                             f"cannot be scored; fine-tune it with train.py --model {folder}, which adds their "
                             f"embeddings, or put back the tokenizer it was trained with")


def padding_id(tokenizer, config):
    """The token id batches are padded with, made the same in the tokenizer and the model's config.

    Decoder classifiers (GPT-2, Llama, …) read each text's class at its last token that is not the
    config's padding id, and refuse batches without one; their tokenizers often have no padding
    token. Such a tokenizer pads with the config's id, else with its end-of-text token (the usual
    choice). Both are saved with the model folder, so `transformers.pipeline` pads the same way.
    """
    pad = tokenizer.pad_token_id
    if pad is None:  # an id past the vocabulary (a config copied from a larger model) is no padding token
        candidates = (getattr(config, "pad_token_id", None), tokenizer.eos_token_id)
        pad = next((i for i in candidates if isinstance(i, int) and 0 <= i < len(tokenizer)), None)
        if pad is None:
            raise SentimentError(f"{tokenizer.name_or_path}: the tokenizer has no padding or end-of-text token to pad "
                                 f"batches with; add one (tokenizer.add_special_tokens) and save it with the model")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    config.pad_token_id = pad
    return pad


# Encoders whose attention masks padding alone, through transformers' `create_bidirectional_mask`, which takes
# a 4D mask as it is (transformers 5.0 on): `broadcast_mask` is for these.
PADDING_ONLY_ATTENTION = {"albert", "bert", "camembert", "distilbert", "electra", "roberta", "xlm-roberta"}


def broadcast_mask(model):
    """Whether `model` is given its padding mask as a boolean [batch, 1, 1, length] tensor rather than the
    collated 2D one. From a 2D mask, transformers' SDPA path asks the device whether any token is padding
    before every forward pass (`padding_mask.all()`, to leave out a mask of ones): on a GPU a wait for all
    the work queued before it, so the CPU could queue nothing ahead. A 4D mask is taken as it is. Only SDPA
    attention, which takes a boolean mask, in the encoders above: a decoder's causal mask, or a local
    window, would be lost."""
    config = model.config
    return config.model_type in PADDING_ONLY_ATTENTION and getattr(config, "_attn_implementation", None) == "sdpa"


# SDPA's attention kernels for batches whose shapes vary, as this project's do (each padded to its own longest
# text): all but cuDNN's. cuDNN attention, PyTorch's first choice on Hopper GPUs, builds a graph for each new
# shape it meets, forward and backward: about 170 ms a training step on an H200, in a step that otherwise took
# 20 ms, at every new batch width; and the Predictor's first pass over 10,000 reviews took 11.7 s against 2.3 s
# for the same pass again. Flash attention takes no padding mask; memory-efficient attention does, and needs no
# graph per shape.
VARYING_SHAPE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def varying_shapes():
    """The context for a forward pass over a batch of this project's: any SDPA kernel but cuDNN's (above). The
    backward pass runs the kernels the forward pass chose."""
    return sdpa_kernel(VARYING_SHAPE_ATTENTION)


def model_inputs(batch, broadcast):
    """The model's arguments from a collated batch: every tensor but the labels, with the padding mask as
    `broadcast` (`broadcast_mask(model)`) says."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if broadcast and "attention_mask" in inputs:
        inputs["attention_mask"] = inputs["attention_mask"][:, None, None, :].bool()
    return inputs


def model_error(name, err):
    if os.path.isfile(name):
        return SentimentError(f"--model {name} is a file; pass its folder, a Hub id, or --model tiny to train a "
                              f"small model offline")
    if not os.path.isdir(name) and (name.startswith(("/", ".", "~")) or name.count("/") > 1):  # no Hub id
        return SentimentError(f"--model {name}: no such folder{did_you_mean(name, folder=True)}")
    beside = (did_you_mean(name, folder=True) if "/" in name and not os.path.isdir(name)
              and os.path.isdir(os.path.dirname(name)) else "")
    what = (f"no such folder{beside}, nor a Hub id that loads" if beside else
            f"could not load this {'folder' if os.path.isdir(name) else 'Hub id'}")
    return SentimentError(f"--model {name}: {what} ({str(err).strip().splitlines()[0]}){offline_note(name)}; pass a "
                          f"local model folder, or --model tiny to train a small model offline")


def position_limit(config):
    """The longest input, in tokens, that the model's position table covers (None if it has none)."""
    return getattr(config, "max_position_embeddings", None)


def check_max_length(max_length, config):
    """Refuse a max length the model cannot take, before it fails deep inside the embedding layer, or one
    that leaves a text too few tokens beside the special ones."""
    if max_length < MIN_LENGTH:
        raise SettingError("max_length", f"must be at least {MIN_LENGTH} tokens, got {max_length}")
    limit = position_limit(config)
    if limit and max_length > limit:
        raise SettingError("max_length", f"{max_length} tokens is over this model's limit of {limit} positions; "
                                         f"use {limit} or less")
    return max_length


def save_model_folder(folder, model, tokenizer, settings):
    """Write a standard Hugging Face folder (safetensors weights) plus `sentiment.json`."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    make_tokenizer_standalone(folder, settings)
    settings.save(folder)
    as_plain_files(glob.glob(os.path.join(folder, "*.safetensors")))


def make_tokenizer_standalone(folder, settings):
    """Teach the saved tokenizer what our inference does before tokenising, so code that reads only
    the Hugging Face files (`transformers.pipeline`) sees the text the model was trained on: markup
    stripped by the tokenizer's own normalizer (the generic fast class loads `tokenizer.json` as
    written; BERT's rebuilds its normalizer and would drop the rule), and long texts cut from the
    left (keeping the end, as tail and head+tail do) at the trained max length when `truncation=True`
    is asked for."""
    if settings.clean:
        path = os.path.join(folder, "tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(path)
        # `<[^<>]*>`, not MARKUP: the tokenizer's backtracking regex engine takes quadratic time on
        # thousands of unclosed `<` with MARKUP. Text our inference cleaned has no tags left either way.
        strip = tokenizers.normalizers.Replace(tokenizers.Regex(r"<[^<>]*>"), " ")
        backend.normalizer = (tokenizers.normalizers.Sequence([strip, backend.normalizer])
                              if backend.normalizer else strip)
        backend.save(path)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["truncation_side"] = "right" if settings.truncation == "head" else "left"
    config["model_max_length"] = settings.max_length
    if settings.clean:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def read_settings(folder, config, tokenizer):
    """Our settings from `sentiment.json`, or, for a folder we did not train, the settings under which
    it scores as `transformers.pipeline` does: truncation at the tokenizer's limit on the tokenizer's
    side (head, or tail when it truncates from the left), no cleaning."""
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.isfile(path):
        with loading(path, "settings", advice="correct the file (README: What training writes) or train again"):
            with open(path) as f:
                saved = json.load(f)
            known = {f.name for f in fields(ModelSettings)}
            if not isinstance(saved, dict) or "labels" not in saved or set(saved) - known:
                raise ValueError(f"not an object of {', '.join(sorted(known))}")
            settings = ModelSettings(**saved)
            problems = settings.problems(config.num_labels)
            if problems:
                raise ValueError("; ".join(problems))
        return settings
    limits = [512, position_limit(config) or 512]
    if 0 < tokenizer.model_max_length < 10**6:  # unset limits are stored as a huge number
        limits.append(tokenizer.model_max_length)
    return ModelSettings(labels=[config.id2label[i] for i in range(config.num_labels)], max_length=min(limits),
                         truncation="tail" if tokenizer.truncation_side == "left" else "head", clean=False)


def what_it_is(folder):
    """What a folder without config.json holds, when it is part of a training run: said after the error."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        return ""
    if os.path.isfile(os.path.join(folder, STATE_FILE)):  # a checkpoint
        run = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
        return f"; it is a training checkpoint: the model is written to its run's folder, {run}, when the run ends"
    return (f"; it is a training run's folder without a model yet, written when the run ends: wait for it, or "
            f"continue a stopped run with train.py --output-dir {folder} --resume latest")


def load_model_folder(folder, dtype=torch.float32, attempts=3):
    """Model (in eval mode, weights in `dtype` whatever the folder was saved in), tokenizer and settings
    from a model folder; clear errors if it is not one. Files are read one after another: if a training
    run publishes a new model meanwhile, they are read again, so the parts always belong together."""
    if not os.path.isdir(folder):
        raise SentimentError(f"{folder}: no such model folder{did_you_mean(folder, folder=True)}; train one with "
                             f"train.py or pass a Hugging Face sequence-classification folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise SentimentError(f"{folder}: not a model folder (no config.json){what_it_is(folder)}")
    check_readable(folder)
    for attempt in range(attempts):
        before = publication(folder)
        if before is not PUBLISHING:
            loaded = read_model_folder(folder, dtype)
            if publication(folder) == before:
                return loaded
        time.sleep(1)  # a run is moving its new model in: a matter of milliseconds, or of a slow disk
    raise SentimentError(f"{folder}: a training run is moving a new model into this folder (see its {PUBLISHING_FILE}"
                         f" file); try again when it has finished, or if it was stopped, finish it with train.py "
                         f"--output-dir {folder} --resume latest")


PUBLISHING = "publishing"


def publication(folder):
    """Which publication of the model folder is in place: `sentiment.json`'s identity (each publication
    replaces it), or PUBLISHING while a live run moves a new one in. A run stopped midway is an error."""
    try:
        with open(os.path.join(folder, PUBLISHING_FILE)) as f:
            host, _, pid = f.read().strip().partition(" ")
    except FileNotFoundError:
        try:
            found = os.stat(os.path.join(folder, SETTINGS_FILE))
        except FileNotFoundError:  # a folder train.py did not write
            return None
        return found.st_ino, found.st_mtime_ns, found.st_size
    if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
        raise SentimentError(f"{folder}: the training run that wrote this model folder was stopped while moving the "
                             f"new model in, so old and new files may be mixed; finish it with train.py "
                             f"--output-dir {folder} --resume latest (or train again with --overwrite)")
    return PUBLISHING


MAX_LABELS = 100_000  # the most labels a model folder's config.json may say it has


def check_label_count(folder):
    """Refuse a config.json whose `num_labels` is no count of labels: transformers names each label in a
    dict before it checks anything, and a `num_labels` of 10**20 took all memory until the process was killed."""
    path = os.path.join(folder, "config.json")
    with loading(path, "model configuration"):
        with open(path) as f:
            saved = json.load(f)
    count = saved.get("num_labels") if isinstance(saved, dict) else None
    if count is not None and not (type(count) is int and 0 < count <= MAX_LABELS):
        raise SentimentError(f"{path}: num_labels is {count!r}, not a count of labels (1 to {MAX_LABELS:,}); write "
                             f"the model's number of labels, or copy the model folder again")


def read_model_folder(folder, dtype):
    check_label_count(folder)
    with loading(os.path.join(folder, "config.json"), "model configuration"):
        config = AutoConfig.from_pretrained(folder)
    architectures = config.architectures if isinstance(config.architectures, list) else []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise SentimentError(f"{folder}: not a sequence classifier (architectures: "
                             f"{config.architectures or 'none'}); fine-tune it with train.py first")
    tokenizer = folder_tokenizer(folder)
    settings = read_settings(folder, config, tokenizer)
    with loading(folder, "weights"):
        model, found = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    if missing := sorted(found["missing_keys"]):  # transformers starts them at random, and says so in a log line
        raise SentimentError(f"{folder}: the weights file lacks {len(missing)} of the model's weights "
                             f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}), which would be random: "
                             f"it is another model's or was saved in part; copy the model folder again, or train it "
                             f"again")
    check_embeddings(folder, model, tokenizer)
    padding_id(tokenizer, model.config)
    return model.eval(), tokenizer, settings


def check_readable(folder):
    """Name the files of the model this user may not read: safetensors reports a weights file it may
    not open as missing ("No such file or directory")."""
    try:
        names = os.listdir(folder)
    except PermissionError:  # the tokenizer's loading lists the folder too
        raise SentimentError(f"{folder}: this user may not list the folder; make it readable (chmod a+rX) "
                             f"or run as the user that wrote it") from None
    unreadable = sorted(name for name in names
                        if (name in MODEL_FILES or name in TOKENIZER_FILES or name.endswith((".safetensors", ".bin")))
                        and not os.access(os.path.join(folder, name), os.R_OK))
    if unreadable:
        raise SentimentError(f"{folder}: this user may not read {', '.join(unreadable)}; make the files readable "
                             f"(chmod a+r) or run as the user that wrote them")


def folder_tokenizer(folder):
    """The tokenizer of a local model folder, refusing one without tokenizer files (see TOKENIZER_FILES)."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise SentimentError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, …); copy them from "
                             f"the model it was trained from")
    with loading(folder, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if type(tokenizer.model_max_length) not in (int, float):  # every call to it failed with a TypeError
        raise SentimentError(f"{folder}: tokenizer_config.json: model_max_length must be a number, got "
                             f"{tokenizer.model_max_length!r}; copy the model folder again")
    return tokenizer


@contextlib.contextmanager
def loading(where, part, advice="copy the model folder again, or train it again"):
    """Turn a failure to load `part` of a model folder into one line that names it: a folder copied
    in part, or a file cut short, otherwise ends in a traceback from deep inside transformers."""
    try:
        yield
    except SentimentError:
        raise
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SentimentError(f"{where}: could not load the {part} ({type(err).__name__}: {detail[:200]}); "
                             f"{advice}") from None
