"""`Predictor`: the one inference core, shared by `infer.py` and the HTTP service.

It loads a model folder once and scores any number of texts: clean them as training did,
tokenise them in one batched call with the saved truncation, sort them by length, cut batches
by count and by a token budget, pad each batch only to its own longest text, run the model under
`torch.inference_mode`, and return label names with temperature-calibrated probabilities in
the order the texts came in. It knows nothing of files or HTTP.
"""

import contextlib
import os
import warnings

import numpy as np
import torch

from .batching import Collator, by_length, encode, special_count
from .config import CPU_BATCH_SIZE, CPU_BATCH_TOKENS, GPU_BATCH_SIZE, GPU_BATCH_TOKENS, PRECISIONS
from .data import clean_texts
from .devices import device_fails, emulated_bf16, native_bf16, pick_device
from .errors import SentimentError, SettingError, warn
from .metrics import output_function, scores
from .modeling import broadcast_mask, check_max_length, load_model_folder, model_inputs, varying_shapes

NOTHING_TO_SCORE = "nothing to score: the text is empty, only markup, or only characters the tokenizer drops"
MAX_PADDING = 0.25  # most padding a batch may add to a text, as a share of the batch's width
ROOMS, ROOM_IDS = 8, 1 << 20  # page-locked rooms a GPU's batches are copied from; most ids (8 MiB) in one


class Staging:
    """Page-locked memory that batches are copied to a GPU from, pinned once and taken in turn: `rooms` rooms
    of `size` ids. A room is taken again only once the copies out of it are done (an event recorded after
    them), so no batch is written over on its way, and the CPU queues at most `rooms` batches ahead of the
    device. Pinned once, as pinning takes the driver's time (on an H200, 3 ms for 4 MiB, 23 ms for 32 MiB):
    too much for every batch or call. A copy from pageable memory may wait for the device's queue."""

    def __init__(self, size, rooms=ROOMS, pin=True):
        self.memory = torch.empty(rooms, size, dtype=torch.long, pin_memory=pin)
        self.copied = [None] * rooms  # each room's event after its last copies, once it has had any
        self.turn = 0

    def room(self, size):
        """(index, memory) of the next room, cut to `size` ids, once the copies out of it are done; None where
        `size` is more than a room holds."""
        if size > self.memory.shape[1]:
            return None
        index = self.turn % len(self.copied)
        self.turn += 1
        if self.copied[index] is not None:
            self.copied[index].synchronize()
        return index, self.memory[index, :size]

    def copied_out(self, index):
        """Call once the copies out of room `index` are queued."""
        self.copied[index] = self.event()

    def event(self):
        """An event recorded now on the current CUDA stream; None where the memory is not page-locked (the
        copies from it were done before they returned)."""
        if not self.memory.is_pinned():
            return None
        event = torch.cuda.Event()
        event.record()
        return event


def half_precision(precision, quantize, device):
    """The 16-bit type to score in (torch.bfloat16 or torch.float16), or None for fp32. fp16 is for
    GPUs without bf16 (V100, T4), where its tensor cores are many times faster than fp32; `auto`
    never picks it, as fp16 can overflow where bf16 cannot."""
    if precision not in PRECISIONS:
        raise SettingError("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in ("bf16", "fp16") and quantize:
        raise SettingError("quantize", f"int8 quantisation and {precision} precision do not combine; pick one")
    if quantize and device.type != "cpu":
        raise SettingError("quantize", "int8 quantisation runs on the CPU only")
    if precision == "fp16" and device.type == "cpu":
        raise SettingError("precision", "fp16 runs on a GPU only; on a CPU use bf16 (AVX512-BF16 or AMX) or fp32")
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.bfloat16 if not quantize and native_bf16(device) else None


def usable_cpus():
    """The CPUs this process may run on (its affinity, as taskset and cpusets set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def not_unicode(texts):
    """What is wrong with the first of `texts` that holds a lone surrogate ("\\udcff"), which is not text:
    bytes decoded with errors="surrogateescape" (as Python decodes file names and arguments) give one."""
    for i, text in enumerate(texts):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"texts[{i}] holds a lone surrogate ({text[err.start]!r} at character {err.start}), which is not "
                    f"Unicode text; decode its bytes with errors='replace' or as the encoding they are in")
    return "a text holds a lone surrogate, which is not Unicode text"


class Predictor:
    """Score texts with the model in `folder`.

    batch_size: most texts in one forward pass. max_batch_tokens: most tokens (texts × padded
    length) in one pass, so long texts come in smaller batches. max_length: override the saved
    limit (up to the model's position limit). quantize='int8': dynamic int8 linear layers on
    the CPU (bench/infer.py measures what it costs in accuracy). precision: 'fp32', 'bf16', 'fp16'
    (GPUs only: for those without bf16, such as V100 and T4), or 'auto': bf16 where the hardware
    has it (a GPU of compute capability 8 or later, or a CPU with AVX512-BF16 or AMX), else fp32.
    On a CPU bf16 means autocast: bench/infer.py measured it 1.6-1.8x faster than fp32 with the same
    label on every review.
    """

    def __init__(self, folder, device=None, batch_size=None, max_batch_tokens=None, max_length=None, threads=None,
                 quantize=None, precision="auto"):
        if threads:
            cpus = usable_cpus()
            if threads > cpus:  # PyTorch takes any number, and a run then fails starting its threads
                raise SettingError("threads", f"{threads} is more than the {cpus} CPUs this process may use; use "
                                              f"{cpus} or fewer")
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        on_gpu = self.device.type != "cpu"
        half = half_precision(precision, quantize, self.device)
        emulated = emulated_bf16(self.device) if half is torch.bfloat16 else None  # asked for: auto never picks it
        if emulated:
            warn(f"precision bf16: {emulated}; {'fp16' if on_gpu else 'fp32'} is faster here")
        if on_gpu and half is None:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 scoring
        # On a GPU the weights themselves are 16-bit; on a CPU bf16 autocast keeps layer norms and softmax in fp32.
        self.cpu_autocast = half is not None and not on_gpu
        model, self.tokenizer, self.settings = load_model_folder(folder, dtype=half if on_gpu and half
                                                                 else torch.float32)
        if quantize == "int8":
            with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated but still the
                warnings.simplefilter("ignore")  # one dependency-free int8 path; its successor is torchao
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        if self.cpu_autocast:
            # Autocast would cast every linear weight to bf16 again on each forward pass (its cache
            # lives only as long as one `autocast` block); cast once here, to the same values.
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
        self.model = model.to(self.device)
        self.broadcast = broadcast_mask(model)  # a forward pass that waits for no device
        self.staged, self.staging = on_gpu, None  # batches copied to the device through page-locked `Staging`
        self.labels = list(self.settings.labels)
        self.max_length = check_max_length(max_length or self.settings.max_length, self.model.config)
        self.batch_size = batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
        self.max_batch_tokens = max(max_batch_tokens or (GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS),
                                    self.max_length)
        self.collate = Collator(self.tokenizer.pad_token_id)  # set for every folder by load_model_folder
        self.specials = special_count(self.tokenizer)  # ids around every text: [CLS] … [SEP]
        self.function = output_function(self.model.config)  # softmax for every model train.py writes

    def encode(self, texts):
        """`TokenIds` of already cleaned, non-empty texts."""
        return encode(self.tokenizer, texts, self.max_length, self.settings.truncation)

    def batches(self, lengths):
        """Index batches over `lengths`, longest first, within the count and token limits.

        A text that would be padded by more than a quarter of the batch's width starts a new
        batch: a few texts in arrival order (the service's batches) then cost about what a long
        sorted file does (bench/serve.py); a large sorted file hardly ever meets the limit.
        """
        order = by_length(lengths)
        batch = []
        for i in order:
            # Sorted longest first, so the batch's first text sets its padded width.
            width = lengths[batch[0]] if batch else lengths[i]
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * width > self.max_batch_tokens
                          or lengths[i] < (1 - MAX_PADDING) * width):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.inference_mode()
    def logits(self, ids):
        """Raw logits (float32 numpy, one row per text, input order) of `TokenIds`."""
        out = np.empty((len(ids), len(self.labels)), dtype=np.float32)
        done = []  # on a GPU the logits stay there: no wait after each batch
        for batch in self.batches(ids.lengths):  # cut as they come: a lack of memory lowers the budget of later ones
            done += self.fitted(ids, batch)
        for batch, logits in done:
            out[batch] = logits.cpu().numpy()  # the first waits for the device; by the last, every copy is done
        return out

    def fitted(self, ids, batch):
        """[(indices, logits)] of one batch. Where the device has no memory for it (a GPU shared with other
        work, a budget set too high), the token budget is halved and the rest of the batch cut to it (and
        so are later batches); a single text that does not fit is a one-line error."""
        done, pending = [], [batch]
        while pending:
            part = pending.pop(0)
            try:
                done.append((part, self.forward(ids, part)))
                continue
            except torch.OutOfMemoryError:
                width = int(ids.lengths[part].max())
                if len(part) == 1:
                    raise SentimentError(f"{self.device} ran out of memory scoring one text of {width} tokens; lower "
                                         f"--max-length, score in bf16 or fp16 (--precision), or free the device"
                                         ) from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the failed batch's blocks back before the smaller ones ask
            self.max_batch_tokens = len(part) // 2 * width
            warn(f"{self.device} ran out of memory on {len(part)} texts of {width} tokens; batches are now at "
                 f"most {self.max_batch_tokens} tokens (--max-batch-tokens)")
            rest, size = [i for p in [part, *pending] for i in p], len(part) // 2
            pending = [rest[i:i + size] for i in range(0, len(rest), size)]
        return done

    def forward(self, ids, batch):
        """The logits (float32, on the device) of the texts `batch` indexes."""
        padded = self.collate([{"input_ids": ids[i]} for i in batch])
        if self.device.type != "cpu" or self.staged:
            padded = self.to_device(padded)
        half = torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_autocast else contextlib.nullcontext()
        with half, varying_shapes():
            return self.model(**model_inputs(padded, self.broadcast)).logits.float()

    def to_device(self, padded):
        """The batch's tensors on the device, copied without waiting for it: on a GPU through a room of
        `Staging`, pinned at the first batch (a batch larger than a room is copied from where it is)."""
        room = None
        if self.staged:
            if self.staging is None:
                self.staging = Staging(min(2 * self.max_batch_tokens, ROOM_IDS), pin=self.device.type == "cuda")
            room = self.staging.room(sum(t.numel() for t in padded.values()))
        moved, at = {}, 0
        for name, tensor in padded.items():
            if room is not None:
                tensor = room[1][at:at + tensor.numel()].view(tensor.shape).copy_(tensor)
                at += tensor.numel()
            moved[name] = tensor.to(self.device, non_blocking=True)
        if room is not None:
            self.staging.copied_out(room[0])
        return moved

    def device_fails(self):
        """Why the Predictor's device can no longer compute, or None while it can (`devices.device_fails`).
        Ask after a model call failed."""
        return device_fails(self.device)

    def probabilities(self, texts):
        """Each label's score for raw texts, one row each: calibrated probabilities from a model train.py
        wrote, the pipeline's scores from any other (`metrics.output_function`); a row of NaN for a text with
        nothing to score: empty, only markup, or only characters the tokenizer drops (control or zero-width
        characters, lone accents), which would be scored as the special tokens alone. `texts` is any
        iterable of strings (None counts as empty); one string is one text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        wrong = next((i for i, text in enumerate(texts) if text is not None and not isinstance(text, str)), None)
        if wrong is not None:
            raise TypeError(f"texts[{wrong}] is {type(texts[wrong]).__name__}, not a string")
        probs = np.full((len(texts), len(self.labels)), np.nan)
        try:
            cleaned = clean_texts(texts) if self.settings.clean else [t if t and t.strip() else None for t in texts]
            valid = np.array([i for i, t in enumerate(cleaned) if t], dtype=np.int64)
            ids = self.encode([cleaned[i] for i in valid]) if len(valid) else None
        except UnicodeEncodeError:  # neither polars nor a tokenizer takes a lone surrogate: a traceback before
            raise ValueError(not_unicode(texts)) from None
        if len(valid):
            probs[valid] = scores(self.logits(ids), self.function, self.settings.temperature)
            probs[valid[ids.lengths <= self.specials]] = np.nan
        return probs

    def predict(self, texts):
        """One dict per text (of an iterable, or one string), in order: label, score and every label's
        score; `error` where there is nothing to score."""
        return [self.answer(p) for p in self.probabilities(texts)]

    def answer(self, probs):
        if np.isnan(probs).any():
            return {"label": None, "score": None, "scores": None, "error": NOTHING_TO_SCORE}
        best = int(probs.argmax())
        return {"label": self.labels[best], "score": float(probs[best]),
                "scores": {label: float(p) for label, p in zip(self.labels, probs)}}
