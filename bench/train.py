"""Training speed and accuracy: the project's loop against Hugging Face `Trainer`, in one run.

Same model (all-MiniLM-L6-v2), rows (first 2,000 of the IMDb CSV to train, last 2,000 to
evaluate), length (256), batch (16), 1 epoch, AdamW lr 5e-5, weight decay 0.01, 10 % linear
warmup, seed 0, fp32. The peer is `Trainer` with `DataCollatorWithPadding`, once as documented
and once with its length-grouped sampler. Then the project's best recipe in the default
`Trainer`'s wall time, and a profile of one training step of ours.

    python -m bench.train [--data ../shared/data/imdb_train_25k.csv] [--skip-trainer]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import DATA, cpu_description, forward_flops, imdb_rows, matmul_rate, minilm_folder
from sentiment.data import clean_texts

ROOT = os.path.join(os.path.dirname(__file__), "..")
SAME = dict(max_length=256, batch_size=16, epochs=1, lr=5e-5, weight_decay=0.01, warmup_ratio=0.1, seed=0)


def run_ours(train_csv, eval_csv, out, model, **overrides):
    settings = {**SAME, **overrides}
    settings.setdefault("mixed_precision", "no")
    settings.setdefault("truncation", "head")
    settings.setdefault("val_size", 0)
    flags = ["--data", train_csv, "--test-data", eval_csv, "--model", model, "--output-dir", out, "--overwrite",
             "--checkpoint-every", "0"]
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return {"wall_s": wall, "train_s": metrics["train_seconds"], "samples_s": metrics["train_samples_per_second"],
            "accuracy": metrics["test_accuracy"], "rows": metrics["data"]["sizes"]["train"],
            "ece_before": metrics["test_ece_before_calibration"], "ece_after": metrics["test_ece_after_calibration"]}


def run_trainer(train, evaluation, model_dir, group_by_length):
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = {"negative": 0, "positive": 1}

    def encode(frame):
        enc = tokenizer(clean_texts(frame["review"].to_list()), truncation=True, max_length=SAME["max_length"])
        return [{"input_ids": i, "attention_mask": m, "labels": labels[y]}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], frame["sentiment"].to_list())]

    start = time.perf_counter()
    train_set, eval_set = encode(train), encode(evaluation)
    torch.manual_seed(SAME["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=SAME["batch_size"],
            per_device_eval_batch_size=64, num_train_epochs=SAME["epochs"], learning_rate=SAME["lr"],
            weight_decay=SAME["weight_decay"], warmup_steps=SAME["warmup_ratio"], lr_scheduler_type="linear",
            seed=SAME["seed"], save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, logging_strategy="no",
            train_sampling_strategy="group_by_length" if group_by_length else "random")
        trainer = Trainer(model=model, args=args, train_dataset=train_set,
                          data_collator=DataCollatorWithPadding(tokenizer))
        result = trainer.train()
        predictions = trainer.predict(eval_set)
    accuracy = float((predictions.predictions.argmax(1) == predictions.label_ids).mean())
    return {"wall_s": time.perf_counter() - start, "train_s": result.metrics["train_runtime"],
            "samples_s": result.metrics["train_samples_per_second"], "accuracy": accuracy, "rows": len(train_set)}


def profile_step(model_dir, frame, steps=12):
    """Seconds per training step of ours, split into tokenisation, collation, forward, backward, optimizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sentiment.batching import Collator, LengthGroupedBatches, encode

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = clean_texts(frame["review"].to_list())
    start = time.perf_counter()
    ids = encode(tokenizer, texts, SAME["max_length"], "head")
    tokenise = (time.perf_counter() - start) / len(texts) * SAME["batch_size"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=SAME["lr"])
    collate = Collator(tokenizer.pad_token_id)
    batches = list(LengthGroupedBatches([len(i) for i in ids], SAME["batch_size"], seed=0))[:steps]
    times = {"collate": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for n, batch_idx in enumerate(batches):
        t0 = time.perf_counter()
        batch = collate([{"input_ids": ids[i], "labels": 0} for i in batch_idx])
        t1 = time.perf_counter()
        loss = model(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t4 = time.perf_counter()
        if n >= 2:  # the first steps warm up the allocator
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key] += seconds / (len(batches) - 2)
    return {"tokenise": tokenise, **times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--model", default=None, help="Model folder; default: the all-MiniLM-L6-v2 package.")
    parser.add_argument("--output-dir", default="outputs/bench-train", help="Model folders of our runs go here.")
    parser.add_argument("--skip-trainer", action="store_true", help="Leave out the two Trainer runs.")
    parser.add_argument("--skip-recipe", action="store_true", help="Leave out the best-recipe run.")
    parser.add_argument("--precision", default="no", help="Mixed precision of our like-for-like run (no = fp32; "
                                                          "bf16 shows what AVX512-BF16 CPUs gain).")
    # The best recipe must fit in the default Trainer's wall time (about 600 s here): bf16 autocast
    # (this CPU has AVX512-BF16) about doubles the step rate, which buys more rows and tokens.
    parser.add_argument("--recipe-rows", type=int, default=2500, help="Training rows of the best recipe.")
    parser.add_argument("--recipe-length", type=int, default=320, help="Max length of the best recipe.")
    parser.add_argument("--recipe-lr", type=float, default=1e-4, help="Learning rate of the best recipe.")
    parser.add_argument("--recipe-precision", default="bf16", help="Mixed precision of the best recipe.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # the tables each run reads
        measure(args, tmp)


def measure(args, tmp):
    model = args.model or minilm_folder()
    torch.set_num_threads(os.cpu_count())
    train, evaluation = imdb_rows(args.data, first=2000), imdb_rows(args.data, last=2000)
    paths = {name: os.path.join(tmp, f"{name}.csv") for name in ("train", "eval", "recipe")}
    train.write_csv(paths["train"])
    evaluation.write_csv(paths["eval"])
    imdb_rows(args.data, first=args.recipe_rows).write_csv(paths["recipe"])

    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(model)
    lengths = [len(i) for i in AutoTokenizer.from_pretrained(model)(
        clean_texts(train["review"].to_list()), truncation=True, max_length=256)["input_ids"]]
    rate = matmul_rate(config)
    limit = rate / (3 * forward_flops(config, lengths) / len(lengths))

    rows = {}
    same = "same" if args.precision == "no" else f"same-{args.precision}"
    rows["ours"] = run_ours(paths["train"], paths["eval"], os.path.join(args.output_dir, same), model,
                            mixed_precision=args.precision)
    print("ours", rows["ours"], flush=True)
    if not args.skip_trainer:
        rows["trainer"] = run_trainer(train, evaluation, model, group_by_length=False)
        print("trainer", rows["trainer"], flush=True)
        rows["trainer_grouped"] = run_trainer(train, evaluation, model, group_by_length=True)
        print("trainer_grouped", rows["trainer_grouped"], flush=True)
    if not args.skip_recipe:  # validation picks the best model and fits the temperature
        rows["ours_best_recipe"] = run_ours(
            paths["recipe"], paths["eval"], os.path.join(args.output_dir, "recipe"), model,
            truncation="head+tail", max_length=args.recipe_length, lr=args.recipe_lr,
            mixed_precision=args.recipe_precision, val_size=0.1)
    profile = profile_step(model, train.head(400))

    print(f"\nmachine: {cpu_description()}, fp32; matmul rate on the model's shapes {rate / 1e9:.0f} GFLOP/s; "
          f"compute limit {limit:.2f} train samples/s at the reviews' real lengths (max 256)")
    print(f"{'run':<18} {'rows':>5} {'wall s':>8} {'train s':>8} {'samples/s':>10} {'of limit':>9} {'accuracy':>9}")
    for name, r in rows.items():
        print(f"{name:<18} {r['rows']:>5} {r['wall_s']:>8.1f} {r['train_s']:>8.1f} {r['samples_s']:>10.2f} "
              f"{r['samples_s'] / limit:>8.0%} {r['accuracy']:>9.4f}")
    if "trainer" in rows:
        for peer in ("trainer", "trainer_grouped"):
            print(f"ours / {peer}: {rows['ours']['samples_s'] / rows[peer]['samples_s']:.2f}x samples/s, "
                  f"accuracy {100 * (rows['ours']['accuracy'] - rows[peer]['accuracy']):+.1f} points")
    if "ours_best_recipe" in rows:
        recipe = rows["ours_best_recipe"]
        print(f"best recipe: expected calibration error on the evaluation rows {recipe['ece_before']:.4f} before, "
              f"{recipe['ece_after']:.4f} after temperature scaling")
    step = sum(profile.values())
    print("one training step of ours (batch 16, max 256): " + ", ".join(
        f"{k} {1000 * v:.0f} ms ({v / step:.0%})" for k, v in profile.items()))
    print(json.dumps({"rows": rows, "profile_s": profile, "limit_samples_s": limit, "matmul_flops": rate},
                     default=float))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
