"""The fine-tuning loop, written out by hand on Hugging Face Accelerate.

`train(args)` reads the data, builds the model, runs AdamW with a linear warmup and decay,
evaluates every epoch (and every `--eval-every` steps), keeps the best model by validation
accuracy in the output folder, checkpoints the full state for exact mid-epoch resume, and ends
by calibrating and testing the best model. The same code runs on one CPU or many GPUs under
`accelerate launch`. Data, batching, models and checkpoint files live in their own modules.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from .batching import Collator, LengthGroupedBatches, TokenizedDataset, by_length, encode
from .checkpointing import CONFIG_FILE, find_checkpoint, load_trainer_state, save_checkpoint
from .data import load_splits
from .errors import SentimentError
from .metrics import classification_report, expected_calibration_error, fit_temperature, softmax
from .modeling import ModelSettings, load_model, load_tokenizer, save_model_folder

LOG_EVERY = 10  # optimizer steps between log lines


def prepare_output_dir(args, accelerator):
    """Refuse to mix a new run into an old one, unless resuming or told to overwrite."""
    busy = os.path.isdir(args.output_dir) and os.listdir(args.output_dir)
    if busy and not args.resume and not args.overwrite:
        raise SentimentError(f"--output-dir {args.output_dir} is not empty; pass --overwrite to replace it, "
                             f"--resume latest to continue it, or choose another folder")
    if accelerator.is_main_process:
        if busy and args.overwrite and not args.resume:
            for name in ("checkpoints", "log.jsonl", "metrics.json"):
                path = os.path.join(args.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and LayerNorm weights (anything one-dimensional)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_loader(dataset, collate, **kwargs):
    # The loader's own generator draws its per-iterator seed, so starting an iterator never
    # touches the global RNG that dropout uses: a resumed run replays dropout exactly.
    return torch.utils.data.DataLoader(dataset, collate_fn=collate, generator=torch.Generator().manual_seed(0),
                                       pin_memory=torch.cuda.is_available(), **kwargs)


def evaluate(model, loader, accelerator):
    """Logits and labels of every example in `loader`, gathered from all processes, each once."""
    model.eval()
    all_logits, all_labels = [], []
    with torch.inference_mode():
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    model.train()
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


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


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Drop log lines written after the checkpoint a run resumes from: they are about to be redone."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def train(args):
    wall_start = time.perf_counter()
    # Several processes without a GPU (`accelerate launch --multi_gpu` on a CPU machine) train
    # over gloo only when Accelerate is told it runs on the CPU. The scheduler is stepped by hand
    # once per optimizer step, so its length is in optimizer steps whatever the process count.
    multi_cpu = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.grad_accum,
                              step_scheduler_with_optimizer=False, log_with=args.report_to,
                              project_dir=args.output_dir)
    config = {**dataclasses.asdict(args), "num_processes": accelerator.num_processes}
    accelerator.print(json.dumps(config, indent=2))
    prepare_output_dir(args, accelerator)
    set_seed(args.seed)

    resume_from = find_checkpoint(args.resume, args.output_dir) if args.resume else None
    # The main process downloads, reads and builds the tokenizer first and saves it; the others
    # then find a warm cache and load the very same tokenizer.
    with accelerator.main_process_first():
        splits = load_splits(args)
        if resume_from:
            tokenizer = AutoTokenizer.from_pretrained(resume_from)
        elif accelerator.is_main_process:
            tokenizer = load_tokenizer(args.model, splits.train["text"].to_list())
            tokenizer.save_pretrained(args.output_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    accelerator.print(f"data: {json.dumps(splits.report)}; labels: {splits.labels}")
    model = load_model(args.model, splits.labels, len(tokenizer))
    settings = ModelSettings(labels=splits.labels, max_length=args.max_length, truncation=args.truncation)

    def dataset(frame):
        ids = encode(tokenizer, frame["text"].to_list(), args.max_length, args.truncation)
        return TokenizedDataset(ids, splits.label_ids(frame))

    train_set, val_set, test_set = dataset(splits.train), dataset(splits.val), dataset(splits.test)
    collate = Collator(tokenizer.pad_token_id, multiple_of=8 if accelerator.device.type == "cuda" else 1)
    batches = LengthGroupedBatches(train_set.lengths, args.batch_size, args.seed)
    train_dl = make_loader(train_set, collate, batch_sampler=batches)

    def eval_loader(data):  # longest first, so padding is small and a too-long batch fails at once
        sorted_set = torch.utils.data.Subset(data, by_length(data.lengths).tolist())
        return accelerator.prepare(make_loader(sorted_set, collate, batch_size=2 * args.batch_size))

    val_dl, test_dl = eval_loader(val_set), eval_loader(test_set)
    # The fused kernel updates every parameter in one pass; PyTorch has it for CPUs and GPUs.
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch = math.ceil(len(train_dl) / args.grad_accum)
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    scheduler = accelerator.prepare(scheduler)
    if args.report_to:
        accelerator.init_trackers("sentiment", config={k: v for k, v in config.items() if v is not None})

    log_path = os.path.join(args.output_dir, "log.jsonl")
    state = {"step": 0, "epoch": 0, "batches_done": 0, "train_seconds": 0.0, "train_samples": 0,
             "best_val_accuracy": -1.0, "best_val_loss": math.inf, "best_step": None, "best_epoch": None}
    if resume_from:
        state = load_trainer_state(resume_from, config)
        accelerator.load_state(resume_from)
        if accelerator.is_main_process:
            truncate_log(log_path, state["step"])
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)

    clock = Stopwatch(state["train_seconds"])

    def checkpoint():
        state["train_seconds"] = clock.seconds
        save_checkpoint(accelerator, args.output_dir, state, config, tokenizer, args.keep_checkpoints)

    def validate():
        """Evaluate on validation; save the model folder when it is the best so far."""
        if len(val_set) == 0:
            return
        logits, labels = evaluate(model, val_dl, accelerator)
        report = classification_report(labels, logits.argmax(1), splits.labels)
        loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
        accelerator.print(f"step {state['step']}: val accuracy {report['accuracy']:.4f} "
                          f"macro F1 {report['macro_f1']:.4f} loss {loss:.4f}")
        if accelerator.is_main_process:
            log_line(log_path, {"step": state["step"], "epoch": state["epoch"], "split": "val", "loss": loss,
                                "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]})
        accelerator.log({"val/accuracy": report["accuracy"], "val/loss": loss}, step=state["step"])
        # Best by accuracy; on a tie, the lower loss (the later, more confident model, usually).
        if (report["accuracy"], -loss) > (state["best_val_accuracy"], -state["best_val_loss"]):
            state.update(best_val_accuracy=report["accuracy"], best_val_loss=loss, best_step=state["step"],
                         best_epoch=state["epoch"])
            if accelerator.is_main_process:
                save_model_folder(args.output_dir, accelerator.unwrap_model(model), tokenizer, settings)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not accelerator.is_main_process)
    running_loss, loss_batches = torch.zeros((), device=accelerator.device), 0
    model.train()
    while state["step"] < total_steps:
        batches.epoch = state["epoch"]
        loader = accelerator.skip_first_batches(train_dl, state["batches_done"]) if state["batches_done"] else train_dl
        clock.start()
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach()
            state["batches_done"] += 1
            state["train_samples"] += len(batch["input_ids"]) * accelerator.num_processes
            loss_batches += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            bar.update(1)
            if state["step"] % LOG_EVERY == 0 or state["step"] == total_steps:
                record = {"step": state["step"], "epoch": state["epoch"], "loss": running_loss.item() / loss_batches,
                          "lr": scheduler.get_last_lr()[0], "samples_per_second": state["train_samples"] / clock.now()}
                running_loss.zero_()
                loss_batches = 0
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_second']:.1f}")
                accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"]}, step=state["step"])
                if accelerator.is_main_process:
                    log_line(log_path, record)
            end_of_epoch = accelerator.gradient_state.end_of_dataloader or state["step"] == total_steps
            if end_of_epoch or (args.eval_every and state["step"] % args.eval_every == 0):
                with clock.paused():
                    validate()
            if end_of_epoch:
                state.update(epoch=state["epoch"] + 1, batches_done=0)
            if args.checkpoint_every and (state["step"] % args.checkpoint_every == 0 or state["step"] == total_steps):
                with clock.paused():
                    checkpoint()
            if end_of_epoch or state["step"] >= total_steps:
                break
        clock.stop()
    bar.close()
    state["train_seconds"] = clock.seconds
    finish(args, accelerator, model, tokenizer, settings, splits, state, val_dl, test_dl, wall_start)
    accelerator.end_training()


def finish(args, accelerator, model, tokenizer, settings, splits, state, val_dl, test_dl, wall_start):
    """Reload the best weights, fit the temperature on validation, test, and write metrics.json."""
    unwrapped = accelerator.unwrap_model(model)
    weights = os.path.join(args.output_dir, "model.safetensors")
    if state["best_step"] is not None and os.path.exists(weights):
        unwrapped.load_state_dict(load_file(weights), strict=True)  # copied onto the model's device
    metrics = {"labels": splits.labels, "best_step": state["best_step"], "best_epoch": state["best_epoch"],
               "steps": state["step"], "data": splits.report,
               "train_samples_per_second": state["train_samples"] / max(state["train_seconds"], 1e-9),
               "train_seconds": state["train_seconds"]}
    if len(splits.val):
        val_logits, val_labels = evaluate(model, val_dl, accelerator)
        val = classification_report(val_labels, val_logits.argmax(1), splits.labels)
        settings.temperature = fit_temperature(val_logits, val_labels)
        metrics.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"], val=val,
                       temperature=settings.temperature)
    if len(splits.test):
        test_logits, test_labels = evaluate(model, test_dl, accelerator)
        test = classification_report(test_labels, test_logits.argmax(1), splits.labels)
        metrics.update(test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"], test=test,
                       test_ece_before_calibration=expected_calibration_error(softmax(test_logits), test_labels),
                       test_ece_after_calibration=expected_calibration_error(
                           softmax(test_logits, settings.temperature), test_labels))
    metrics["wall_seconds"] = time.perf_counter() - wall_start
    if accelerator.is_main_process:
        save_model_folder(args.output_dir, unwrapped, tokenizer, settings)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    summary = {k: metrics.get(k) for k in ("val_accuracy", "test_accuracy", "test_macro_f1",
                                           "train_samples_per_second", "wall_seconds", "best_epoch")}
    accelerator.print(f"done: {json.dumps(summary)}; model folder: {args.output_dir}")
    accelerator.wait_for_everyone()
    return metrics
