"""The fine-tuning loop, written out by hand on Hugging Face Accelerate.

`train(args)` runs a `FineTuneRecipe` in named phases, as torchtune's recipes do: `setup` reads
the data, builds the model, optimizer and schedule and, on `--resume`, restores the checkpoint;
`train` runs AdamW with a linear warmup and decay, evaluates every epoch (and every
`--eval-every` steps), keeps the best model by validation accuracy in the output folder and
calls `save_checkpoint` for exact mid-epoch resume; `cleanup` calibrates and tests the best
model and writes the metrics. The same code runs on one CPU or many GPUs under `accelerate
launch`. Data, batching, models and checkpoint files live in their own modules.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from .batching import Collator, LengthGroupedBatches, TokenizedDataset, by_length, encode, special_count
from .checkpointing import (TrainState, best_weights, check_random_states, find_checkpoint, forget_after,
                            load_trainer_state, save_checkpoint)
from .config import CONFIG_FILE, LOG_FILE
from .data import load_splits
from .devices import device_fails, emulated_bf16
from .errors import SentimentError, n_rows, say, warn
from .files import as_plain_files, disk_full, disk_full_error, replace_durably, write_atomically
from .graphs import BUCKET, GraphedSteps, check_cuda_graphs, cuda_graph_capture
from .launcher import (free_the_group_at_the_end, launcher_gone, outliving_their_readers, peer_gone, stop_signals,
                       stop_with_the_launcher)
from .metrics import (classification_report, expected_calibration_error, fit_temperature, inverse_frequency_weights,
                      reliability_bins, softmax)
from .modeling import (ModelSettings, broadcast_mask, check_max_length, grow_embeddings, load_model, load_tokenizer,
                       model_inputs, padding_id, varying_shapes)
from .outputs import claim, log_line, publish_model, truncate_log
from .report import write_report_or_say_how

LOG_EVERY = 10  # optimizer steps between log lines
FEW_STEPS = 10  # a run of fewer optimizer steps (unless --max-steps asks for them) learns next to nothing


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and LayerNorm weights (anything one-dimensional)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loader_workers():
    """Processes that collate and pin the next batches while the GPU runs this one; none on a CPU,
    whose cores the model needs."""
    return 2 if torch.cuda.is_available() else 0


def ignore_stop_signals(worker_id):
    """Ctrl-C, SIGTERM and SIGHUP are the main process's to act on: it stops at the next step with a
    checkpoint and ends its workers itself. A terminal, Slurm, systemd or `timeout` signals every
    process of the run, and a worker that SIGTERM killed ended the run in a traceback, checkpoint-less."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset, collate, **kwargs):
    # The loader's own generator draws its per-iterator seed, so starting an iterator never
    # touches the global RNG that dropout uses: a resumed run replays dropout exactly.
    workers = loader_workers()
    return torch.utils.data.DataLoader(dataset, collate_fn=collate, generator=torch.Generator().manual_seed(0),
                                       pin_memory=torch.cuda.is_available(), num_workers=workers,
                                       persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals, **kwargs)


def few_steps_warning(total_steps, args, rows, processes):
    """The warning for a run of fewer than `FEW_STEPS` optimizer steps, which learns next to nothing
    (a batch as large as the data, say); None for more, or where --max-steps asks for so few."""
    if total_steps >= FEW_STEPS or args.max_steps:
        return None
    shape = (f"batches of {args.batch_size:,}" + (f" on each of {processes} processes" if processes > 1 else "")
             + (f", {args.grad_accum} a step" if args.grad_accum > 1 else ""))
    return (f"{total_steps} optimizer step{'s' if total_steps > 1 else ''} in all ({n_rows(rows)} to train "
            f"on, {shape}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}): too few to learn from; lower "
            f"--batch-size{' or --grad-accum' if args.grad_accum > 1 else ''}, or raise --epochs")


def window_scale(batch_index, batches, accumulation):
    """What the loss of batch `batch_index` (of `batches` in the epoch) is multiplied by so that the
    last, short accumulation window weighs as much as a full one: Accelerate divides every loss by
    the full window's size."""
    start = batch_index - batch_index % accumulation
    return accumulation / min(accumulation, batches - start)


def evaluate(model, loader, accelerator, broadcast, desc="evaluate"):
    """Logits and labels of every example in `loader`, gathered from all processes, each once; the padding mask
    as `broadcast` says (`modeling.broadcast_mask`)."""
    model.eval()
    all_logits, all_labels = [], []
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process)
    with torch.inference_mode(), varying_shapes(), bar:  # the bar closed on an error too: its line is then its own
        for batch in bar:
            logits = model(**model_inputs(batch, broadcast)).logits.float()
            labels = batch["labels"]
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            all_logits.append(logits)  # kept on the device: a copy to the CPU here would wait for it each batch
            all_labels.append(labels)
    model.train()
    return torch.cat(all_logits).cpu().numpy(), torch.cat(all_labels).cpu().numpy()


class Stopwatch:
    """Seconds spent training: evaluation and checkpoints run `paused()` and do not count."""

    def __init__(self, seconds=0.0):
        self.seconds, self.since = seconds, None

    def start(self):
        self.since = time.perf_counter()

    def stop(self):
        self.seconds += time.perf_counter() - self.since
        self.since = None

    def now(self):
        return max(self.seconds + (time.perf_counter() - self.since if self.since else 0.0), 1e-9)

    @contextlib.contextmanager
    def paused(self):
        self.stop()
        try:
            yield
        finally:
            self.start()


def every(n, step):
    """Whether something done every `n` steps (None or 0: never) is due at `step`."""
    return bool(n) and step % n == 0


def make_accelerator(args):
    # Several processes without a GPU (`accelerate launch --multi_gpu` on a CPU machine) train
    # over gloo only when Accelerate is told it runs on the CPU. The scheduler is stepped by hand
    # once per optimizer step, so its length is in optimizer steps whatever the process count.
    multi_cpu = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available()
    # A CUDA graph keeps the casts it captured: autocast's cache of them must be off.
    autocast = [AutocastKwargs(cache_enabled=False)] if args.cuda_graphs else None
    free_the_group_at_the_end()
    try:
        with warnings.catch_warnings():  # a tracker that is not installed: said below, in one line
            warnings.filterwarnings("ignore", message=".*`log_with=")
            accelerator = Accelerator(cpu=multi_cpu, mixed_precision=args.mixed_precision,
                                      gradient_accumulation_steps=args.grad_accum, step_scheduler_with_optimizer=False,
                                      log_with=args.report_to, project_dir=args.output_dir,
                                      dataloader_config=DataLoaderConfiguration(non_blocking=True),  # pinned batches
                                      kwargs_handlers=autocast)
    except ValueError as err:
        if args.report_to and "logging capability" in str(err):
            raise SentimentError(f"--report-to {args.report_to}: {err}") from None
        raise
    if args.report_to and not accelerator.log_with:  # Accelerate drops it with a warning, and nothing is logged
        install = (f"it (pip install {args.report_to})" if args.report_to != "all"
                   else "one (pip install tensorboard, say)")
        raise SentimentError(f"--report-to {args.report_to}: no such tracker is installed here; install {install} "
                             f"or leave --report-to out")
    if accelerator.device.type == "cuda" and accelerator.mixed_precision == "no":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 training at tensor-core speed
    emulated = emulated_bf16(accelerator.device) if accelerator.mixed_precision == "bf16" else None
    if emulated:  # bf16 may come from the launcher's config, written for another machine
        instead = "fp16" if accelerator.device.type == "cuda" else "no"
        if accelerator.is_local_main_process:
            warn(f"bf16 mixed precision: {emulated}; train with --mixed-precision {instead}")
    if args.cuda_graphs:
        check_cuda_graphs(args, accelerator)
    return accelerator


class FineTuneRecipe:
    """One training run: `setup()`, then `train()`, then `cleanup()`; `train` calls `save_checkpoint()`."""

    def __init__(self, args):
        self.args = args
        self.wall_start = time.perf_counter()
        self.accelerator = make_accelerator(args)
        # The mixed precision in effect, from the flag or the launcher's config: a resume checks it.
        self.config = {**dataclasses.asdict(args), "mixed_precision": self.accelerator.mixed_precision,
                       "num_processes": self.accelerator.num_processes}
        self.log_path = os.path.join(args.output_dir, LOG_FILE)
        self.signals = []  # Ctrl-C / SIGTERM received: stop at the next step, with a checkpoint
        self.finite_step = 0  # the last step at which the loss and weights were seen finite

    def warn(self, message):
        """`warning: <message>` on stderr in one write, by one process a machine: every process meets it."""
        if self.accelerator.is_local_main_process:
            warn(message)

    # setup ----------------------------------------------------------------------------------

    def setup(self):
        args, accelerator = self.args, self.accelerator
        accelerator.print(json.dumps(self.config, indent=2))
        self.lock = claim(args, accelerator)
        set_seed(args.seed)
        self.resume_from = find_checkpoint(args.resume, args.output_dir) if args.resume else None
        self.setup_data()
        self.setup_optimization()
        self.setup_state()

    def setup_data(self):
        """Splits, tokenizer, model and settings; the tokenised splits and their loaders."""
        args, accelerator = self.args, self.accelerator
        with accelerator.main_process_first():  # the main process fills the Hub cache; the others then read it
            self.splits = load_splits(args)
            self.tokenizer = (AutoTokenizer.from_pretrained(self.resume_from) if self.resume_from
                              else load_tokenizer(args.model, self.splits.train["text"].to_list()))
        self.config["data_digest"] = self.splits.digest()  # a resume checks that the rows are the same
        check_same_data(args, accelerator, self.config["data_digest"])
        accelerator.print(f"data: {json.dumps(self.splits.report)}; labels: {self.splits.labels}")
        self.model = load_model(args.model, self.splits.labels, len(self.tokenizer), args.attention_dropout)
        self.broadcast = broadcast_mask(self.model)  # a forward pass that waits for no device
        if added := grow_embeddings(self.model, len(self.tokenizer)):
            self.warn(f"{args.model}: its tokenizer has tokens its model has no embeddings for ({added}, added "
                      f"to the tokenizer alone); they get new ones, learnt in training")
        self.settings = ModelSettings(labels=self.splits.labels, truncation=args.truncation,
                                      max_length=check_max_length(args.max_length, self.model.config))
        self.train_set, self.val_set, self.test_set = map(self.dataset, ("train", "val", "test"))
        classes = len(set(self.train_set.labels))
        if classes < 2:  # every row, or every row of all classes but one, was only characters the tokenizer drops
            raise SentimentError(f"{args.data}: after leaving out the rows the tokenizer keeps nothing of, the "
                                 f"training rows hold {n_rows(len(self.train_set))} of {classes} "
                                 f"class{'' if classes == 1 else 'es'}; a classifier needs two or more. Is "
                                 f"{args.text_column!r} the text column? Name it with --text-column")
        self.class_weights = None
        if args.class_weights == "auto":
            weights = inverse_frequency_weights(self.splits.label_ids(self.splits.train), len(self.splits.labels))
            self.config["class_weight_values"] = dict(zip(self.splits.labels, weights.tolist()))
            self.class_weights = torch.tensor(weights, dtype=torch.float32, device=accelerator.device)
        if args.cuda_graphs and not self.broadcast:  # its forward pass would ask the device about the padding mask
            raise SentimentError(f"--cuda-graphs: {args.model} is not among the encoders whose forward pass asks the "
                                 f"device nothing (BERT, DistilBERT, RoBERTa and their kin, with SDPA attention); "
                                 f"leave --cuda-graphs out")
        pad = padding_id(self.tokenizer, self.model.config)
        self.collate = Collator(pad, multiple_of=8 if accelerator.device.type == "cuda" else 1)
        self.batches = LengthGroupedBatches(self.train_set.lengths, args.batch_size, args.seed)
        # Graphed, a few padded widths: one graph each.
        train_collate = Collator(pad, multiple_of=BUCKET, most=self.settings.max_length) if args.cuda_graphs \
            else self.collate
        self.train_dl = make_loader(self.train_set, train_collate, batch_sampler=self.batches)
        self.val_dl, self.test_dl = self.eval_loader(self.val_set), self.eval_loader(self.test_set)

    def dataset(self, split):
        """A split tokenised once, with the settings the model folder will record. Rows whose text the
        tokenizer keeps nothing of (only control or zero-width characters) are left out, as inference
        refuses to score such a text: trained on, each was a bare [CLS] [SEP] with a label."""
        frame = getattr(self.splits, split)
        ids = encode(self.tokenizer, frame["text"].to_list(), self.settings.max_length, self.settings.truncation,
                     progress=f"tokenise {split}" if self.accelerator.is_main_process else None)
        kept = ids.lengths > special_count(self.tokenizer)
        if not kept.all():
            empty, example = len(kept) - int(kept.sum()), frame["text"][int(np.argmin(kept))]
            frame = self.splits.leave_out_untokenised(split, kept)
            ids = ids.take(np.flatnonzero(kept))
            self.warn(f"{empty} row{'s' if empty > 1 else ''} of the {split} split left out: the tokenizer keeps "
                      f"nothing of {'their' if empty > 1 else 'its'} text (only control or zero-width characters, "
                      f"such as {example[:20]!r})")
        return TokenizedDataset(ids, self.splits.label_ids(frame))

    def eval_loader(self, data):
        """Longest first, so padding is small and a too-long batch fails at once."""
        sorted_set = torch.utils.data.Subset(data, by_length(data.lengths).tolist())
        return self.accelerator.prepare(make_loader(sorted_set, self.collate, batch_size=2 * self.args.batch_size))

    def setup_optimization(self):
        args, accelerator = self.args, self.accelerator
        # The fused kernel updates every parameter in one pass; PyTorch has it for CPUs and GPUs.
        optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                      fused=accelerator.device.type in ("cpu", "cuda"))
        self.model, self.optimizer, self.train_dl = accelerator.prepare(self.model, optimizer, self.train_dl)
        steps_per_epoch = math.ceil(len(self.train_dl) / args.grad_accum)
        self.total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
        if warning := few_steps_warning(self.total_steps, args, len(self.train_set), accelerator.num_processes):
            self.warn(warning)
        self.scheduler = accelerator.prepare(get_linear_schedule_with_warmup(
            self.optimizer, int(args.warmup_ratio * self.total_steps), self.total_steps))

    def setup_state(self):
        """A fresh `TrainState`, or the checkpoint's (after checking the invariants) with its weights and RNG."""
        accelerator = self.accelerator
        if self.args.report_to:
            accelerator.init_trackers("sentiment", config={k: v for k, v in self.config.items() if v is not None})
        self.state = TrainState()
        if self.resume_from:
            self.state = load_trainer_state(self.resume_from, self.config)
            if accelerator.is_main_process:
                check_random_states(self.resume_from, accelerator.num_processes)
            try:
                accelerator.load_state(self.resume_from)
            except Exception as err:  # a file the checks could not see is damaged: one line, not a traceback
                raise SentimentError(f"cannot resume from {self.resume_from}: {type(err).__name__}: "
                                     f"{str(err).strip()[:200]}; resume from an older checkpoint") from None
            if accelerator.is_main_process:
                truncate_log(self.log_path, self.state.step)
                forget_after(self.args.output_dir, self.resume_from, self.state.step)
            accelerator.wait_for_everyone()
            accelerator.print(f"resumed from {self.resume_from} at step {self.state.step}")
            patience = self.args.early_stopping_patience
            if self.state.stopped_early and (not patience or self.state.evals_since_best < patience):
                accelerator.print(f"going on past the early stop at step {self.state.step}: "
                                  f"--early-stopping-patience is now {patience or 'off'}")
                self.state.stopped_early = None
        if accelerator.is_main_process:
            write_atomically(os.path.join(self.args.output_dir, CONFIG_FILE), json.dumps(self.config, indent=2))
        self.clock = Stopwatch(self.state.train_seconds)

    # train ----------------------------------------------------------------------------------

    def train(self):
        # The model is always `self.model`, never a local: `close` lets go of its DDP wrapper before the group.
        args, accelerator, state = self.args, self.accelerator, self.state
        self.bar = bar = tqdm(total=self.total_steps, initial=state.step, desc="train",
                              disable=not accelerator.is_main_process)  # closed by `close` after an error
        running_loss, loss_batches = torch.zeros((), device=accelerator.device), 0
        graphed = GraphedSteps(self.train_step, self.optimizer, cuda_graph_capture()) if args.cuda_graphs else None
        self.model.train()
        for epoch in range(state.epoch, args.epochs):
            if state.step >= self.total_steps or state.stopped_early:  # --max-steps or early stopping ended it
                break
            state.epoch = self.batches.epoch = epoch
            loader = self.train_dl
            if state.batches_done:  # resumed mid-epoch: skip what the checkpoint had done
                loader = accelerator.skip_first_batches(self.train_dl, state.batches_done)
                loader._non_blocking = self.train_dl._non_blocking  # dropped by Accelerate before 1.16
            self.clock.start()
            for batch in loader:
                with accelerator.accumulate(self.model):
                    if graphed:  # the steps below, replayed as one CUDA graph
                        loss = graphed.step(batch)
                    else:
                        loss = self.train_step(batch)
                running_loss += loss.detach()
                loss_batches += 1
                state.batches_done += 1
                state.train_samples += len(batch["input_ids"]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                self.scheduler.step()
                state.step += 1
                bar.update(1)
                last = accelerator.gradient_state.end_of_dataloader or state.step == self.total_steps
                # log
                if state.step % LOG_EVERY == 0 or state.step == self.total_steps:
                    self.check_finite(running_loss)
                    self.log_train(running_loss.item() / loss_batches, bar)
                    running_loss.zero_()
                    loss_batches = 0
                # evaluate, keep the best model, and stop early once it has stopped getting better
                stop = False
                if last or every(args.eval_every, state.step):
                    with self.clock.paused():
                        stop = self.evaluate_and_keep_best()
                if last:  # an early stop keeps its true place, so a resume with more patience goes on from it
                    state.epoch, state.batches_done = epoch + 1, 0
                # checkpoint
                final = state.step == self.total_steps
                if every(args.checkpoint_every, state.step) or (args.checkpoint_every and final):
                    with self.clock.paused():
                        self.save_checkpoint()
                # stop on Ctrl-C or SIGTERM, all processes together, with a checkpoint
                if self.stop_requested():
                    self.stop()
                if last or stop:
                    break
            self.clock.stop()
        bar.close()
        state.train_seconds = self.clock.seconds

    def log_train(self, loss, bar):
        state = self.state
        record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_second": state.train_samples / self.clock.now()}
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_second']:.1f}")
        self.accelerator.log({"train/loss": loss, "train/lr": record["lr"]}, step=state.step)
        if self.accelerator.is_main_process:
            log_line(self.log_path, record)

    def validate(self):
        """The validation figures (accuracy, macro F1, loss), logged; None when there is no validation split."""
        if len(self.val_set) == 0:
            return None
        logits, labels = evaluate(self.model, self.val_dl, self.accelerator, self.broadcast)
        report = classification_report(labels, logits.argmax(1), self.splits.labels)
        figures = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                   "loss": float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))}
        self.accelerator.print(f"step {self.state.step}: val accuracy {figures['accuracy']:.4f} "
                               f"macro F1 {figures['macro_f1']:.4f} loss {figures['loss']:.4f}")
        if self.accelerator.is_main_process:
            log_line(self.log_path, {"step": self.state.step, "epoch": self.state.epoch, "split": "val", **figures})
        self.accelerator.log({"val/accuracy": figures["accuracy"], "val/loss": figures["loss"]}, step=self.state.step)
        return figures

    def train_step(self, batch):
        """Forward, backward, clipping and AdamW's update on one batch; the batch's loss."""
        args, accelerator = self.args, self.accelerator
        # forward/backward (Accelerate divides the loss by --grad-accum; a short last window is scaled back)
        loss = self.loss(batch)
        accelerator.backward(loss * window_scale(self.state.batches_done, len(self.train_dl), args.grad_accum))
        # clip, on the steps that update the weights
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        # step (a no-op between accumulation boundaries)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def loss(self, batch):
        """Cross-entropy of a batch, each class weighted as --class-weights says."""
        with varying_shapes():
            logits = self.model(**model_inputs(batch, self.broadcast)).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights)

    def evaluate_and_keep_best(self):
        """Validate; keep the weights if they are the best so far; True when early stopping ends the run."""
        state, accelerator, patience = self.state, self.accelerator, self.args.early_stopping_patience
        self.check_finite()  # weights of NaN could score "best" on a skewed validation split
        figures = self.validate()
        if figures is None:
            return False
        if state.is_better(figures["accuracy"], figures["loss"]):
            state.best_val_accuracy, state.best_val_loss = figures["accuracy"], figures["loss"]
            state.best_step, state.best_epoch, state.evals_since_best = state.step, state.epoch, 0
            if accelerator.is_main_process:  # the next checkpoint takes a copy
                path = best_weights(self.args.output_dir)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    safetensors.torch.save_model(self.plain_model(), path + ".tmp")
                    as_plain_files([path + ".tmp"])
                    replace_durably(path + ".tmp", path)  # never a half-written best model
                finally:
                    if os.path.exists(path + ".tmp"):  # a full disk: give its space back
                        os.remove(path + ".tmp")
        else:
            state.evals_since_best += 1
        accelerator.wait_for_everyone()
        if patience and state.evals_since_best >= patience:
            accelerator.set_trigger()
        if not accelerator.check_trigger():  # every process stops at the same evaluation
            return False
        state.stopped_early = (f"early stopping: no better validation accuracy in {state.evals_since_best} "
                               f"evaluations since step {state.best_step}")
        accelerator.print(f"step {state.step}: {state.stopped_early}")
        if accelerator.is_main_process:
            log_line(self.log_path, {"step": state.step, "epoch": state.epoch, "event": "stop",
                                     "reason": state.stopped_early})
        return True

    def plain_model(self):
        """The model without Accelerate's wrappers or torch.compile's (`accelerate launch --dynamo_backend
        inductor`): its weights carry the model's own names, so a run with or without compiling can load them."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def check_finite(self, running_loss=None):
        """Stop the run once its loss or weights are NaN or infinite: a diverged run would go on for
        hours, and its checkpoints would rotate the good ones away. Checked where the loop syncs
        anyway (logging, evaluation, checkpoints), all processes together."""
        if running_loss is not None:  # NaN weights make the next loss NaN: the loss is enough here
            finite = self.accelerator.reduce(running_loss.detach(), reduction="sum").isfinite()
        else:
            finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        if finite.item():
            self.finite_step = self.state.step
            return
        args = self.args
        hints = [f"a lower --lr (it is {args.lr:g})"]
        if not args.max_grad_norm:
            hints.append("--max-grad-norm above 0")
        if self.accelerator.mixed_precision == "fp16":
            hints.append("bf16 rather than fp16 where the hardware has it (fp16 overflows where bf16 does not)")
        raise SentimentError(f"the run diverged: its loss or weights became NaN or infinite between step "
                             f"{self.finite_step} and step {self.state.step}; nothing from after step "
                             f"{self.finite_step} was saved. Train again (--overwrite) with {' and '.join(hints)}")

    def save_checkpoint(self):
        self.check_finite()  # never a checkpoint of NaN weights, which rotation would keep over the good ones
        self.state.train_seconds = self.clock.seconds
        return save_checkpoint(self.accelerator, self.args.output_dir, self.state, self.config, self.tokenizer,
                               self.args.keep_checkpoints)

    def stop_requested(self):
        if self.accelerator.num_processes == 1:
            return bool(self.signals)
        if self.signals:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def stop(self):
        """Save a checkpoint where the loop stands, say where, and exit as the signal asks (130, 143, 129)."""
        signum = self.signals[0] if self.signals else signal.SIGTERM
        self.bar.close()  # what is said below starts a line of its own
        with self.clock.paused():
            folder = self.save_checkpoint()
        self.accelerator.print(f"stopped by {signal.Signals(signum).name} at step {self.state.step}: checkpoint "
                               f"saved in {folder}; continue with --resume latest", file=sys.stderr)
        self.accelerator.wait_for_everyone()
        raise SystemExit(128 + signum)  # `close` frees the process group, as at the end of a run

    # cleanup --------------------------------------------------------------------------------

    def cleanup(self):
        """Reload the best weights, fit the temperature on validation, test, and write the model folder and metrics."""
        args, accelerator, state = self.args, self.accelerator, self.state
        unwrapped = self.plain_model()
        if state.best_step is not None and os.path.exists(best_weights(args.output_dir)):
            safetensors.torch.load_model(unwrapped, best_weights(args.output_dir))  # copied onto the model's device
        metrics = {"labels": self.splits.labels, "best_step": state.best_step, "best_epoch": state.best_epoch,
                   "steps": state.step, "data": self.splits.report,
                   "train_samples_per_second": state.train_samples / max(state.train_seconds, 1e-9),
                   "train_seconds": state.train_seconds, "stopped_early": state.stopped_early,
                   **self.final_figures()}
        metrics["wall_seconds"] = time.perf_counter() - self.wall_start
        if accelerator.is_main_process:
            publish_model(args.output_dir, unwrapped, self.tokenizer, self.settings, metrics)
            write_report_or_say_how(args.output_dir)
        summary = {k: metrics.get(k) for k in ("val_accuracy", "test_accuracy", "test_macro_f1",
                                               "train_samples_per_second", "wall_seconds", "best_epoch")}
        accelerator.print(f"done: {json.dumps(summary)}; model folder: {args.output_dir}")
        accelerator.wait_for_everyone()
        return metrics

    def close(self):
        """Close the progress bar, flush the trackers and free the process group, at the end of a run, a stop
        or an error. The model's DDP wrapper goes first: its reducer holds the group too, and freed after
        `destroy_process_group` it frees the group itself, joining gloo's threads while it holds the GIL,
        which a thread still dropping a finished collective's tensors waits for: the process hung as it ended
        (one run in 16, two at a time on two cores). Freed by `destroy_process_group`, the group lets go of
        the GIL as it joins. Called once, from `train_recipe`'s `finally`, under the signal handlers."""
        if getattr(self, "bar", None) is not None:  # an error's line then starts a line of its own
            self.bar.close()
        if device_fails(self.accelerator.device):
            return  # a device-side assert: every later CUDA call fails, NCCL's teardown too; the exit frees all
        if getattr(self, "model", None) is not None:
            self.model = self.plain_model()
        self.accelerator.free_memory()  # Accelerate's own references to the wrapper; collects the garbage
        self.accelerator.end_training()

    def final_figures(self):
        """Validation figures and the fitted temperature; test figures with calibration error before and after."""
        figures, labels, settings = {}, self.splits.labels, self.settings
        if len(self.splits.val):
            val_logits, val_labels = evaluate(self.model, self.val_dl, self.accelerator, self.broadcast)
            val = classification_report(val_labels, val_logits.argmax(1), labels)
            settings.temperature = fit_temperature(val_logits, val_labels)
            figures.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"], val=val,
                           temperature=settings.temperature)
        if len(self.splits.test):
            test_logits, test_labels = evaluate(self.model, self.test_dl, self.accelerator, self.broadcast)
            test = classification_report(test_labels, test_logits.argmax(1), labels)
            before, after = softmax(test_logits), softmax(test_logits, settings.temperature)
            figures.update(test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"], test=test,
                           test_ece_before_calibration=expected_calibration_error(before, test_labels),
                           test_ece_after_calibration=expected_calibration_error(after, test_labels),
                           test_reliability={"before": reliability_bins(before, test_labels),
                                             "after": reliability_bins(after, test_labels)})
        return figures


# Signals this close together are one request: the terminal and torchrun each pass on one Ctrl-C,
# and Linux may repeat the one sent when `accelerate launch` dies (once for each of its threads).
SAME_SIGNAL_S = 1.0


@contextlib.contextmanager
def stop_on_signals(received, finished=None):
    """Ctrl-C, SIGTERM and a closed terminal's SIGHUP append to `received` (the loop stops at the next
    step); another one, more than SAME_SIGNAL_S later, stops at once: one line, and exit 128 + its number.
    So does the death of a one-process `accelerate launch` (`launcher`). `finished()`, where given, tells
    whether the run has written its model folder, which that line then names."""
    first = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            first.append(time.monotonic())
        elif time.monotonic() - first[0] > SAME_SIGNAL_S and not launcher_gone():
            received.append(signum)
            raise KeyboardInterrupt(signum)

    previous = {s: signal.signal(s, handler) for s in stop_signals()}
    try:
        stop_with_the_launcher()
        yield
    except (KeyboardInterrupt, Exception):
        # Native code that calls back into Python (polars' and tokenizers' Rust, through pyo3) may swallow the
        # KeyboardInterrupt and raise its own error: asked twice, the run stops as asked, whatever it became.
        if len(received) < 2:
            raise
        signum, written = received[-1], finished and finished()
        name = signal.Signals(signum).name
        if written:
            say(f"stopped at once by {name} as the run ended, its model folder written: {written}")
        else:
            say(f"stopped at once by {name}, the second request to stop: the steps since the newest checkpoint are "
                f"lost; continue from it with --resume latest")
        raise SystemExit(128 + signum) from None
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def check_same_data(args, accelerator, digest):
    """Every process reads the data on its own: the same rows, or a clear stop. Different copies of the
    file (one per machine) or a file changed as the run starts would otherwise train each process on
    other rows, or hang it at the end of a shorter epoch, waiting for the others."""
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=accelerator.device)
    digests = [bytes(row).hex() for row in accelerator.gather(mine).view(-1, len(mine)).tolist()]
    if len(set(digests)) > 1:
        differ = [rank for rank, other in enumerate(digests) if other != digests[0]]
        raise SentimentError(f"the processes of this run read different data: process{'es' if len(differ) > 1 else ''} "
                             f"{', '.join(map(str, differ))} found other rows than process 0 in {args.data}"
                             f"{''.join(f', {p}' for p in (args.val_data, args.test_data) if p)}; give every machine "
                             f"the same copy, and leave it unchanged while the run starts")


def train(args):
    # What the run prints is not its work: a terminal that closes, or a `| tee` that Ctrl-C ends, must not end it
    # before its checkpoint, by a progress bar's write that fails.
    with outliving_their_readers("stdout", "stderr"):
        return train_recipe(args)


def train_recipe(args):
    recipe, metrics = FineTuneRecipe(args), None
    try:
        with stop_on_signals(recipe.signals, finished=lambda: metrics and args.output_dir):
            try:
                recipe.setup()
                recipe.train()
                metrics = recipe.cleanup()
                return metrics
            finally:
                recipe.close()  # under the handlers too: Ctrl-C twice while the processes are freed is one line
    except torch.OutOfMemoryError:  # in the first step, as the longest batch comes first
        state = getattr(recipe, "state", None)
        when = f"at step {state.step + 1}" if state else "before training (setting up)"
        raise SentimentError(f"{recipe.accelerator.device} ran out of memory {when} with batches of {args.batch_size} "
                             f"texts (twice that to evaluate) of up to {args.max_length} tokens; lower --batch-size "
                             f"(raising --grad-accum keeps the batch each update sees), lower --max-length, or train "
                             f"in --mixed-precision bf16") from None
    except (OSError, RuntimeError) as err:
        if disk_full(err):
            raise disk_full_error(args.output_dir, err, "continue with --resume latest") from None
        if gone := peer_gone(err):
            raise gone from None
        raise
    finally:
        if getattr(recipe, "lock", None):
            recipe.lock.close()  # the output folder is free for the next run, even after a crash
