"""GPU training speed: the project's train.py against Hugging Face `Trainer`, DistilBERT, bf16, max length 512.

Needs no download: it writes 25,000 generated reviews whose token lengths follow IMDb's (median
about 230 tokens, 15 % over 512), a WordPiece vocabulary for them, and a DistilBERT with the
seed architecture (6 layers, hidden 768, 12 heads) randomly initialised, which times the same
work as the pretrained weights. Both trainers get the same folder, rows, batch and precision.
Prints tokens/s, samples/s, model FLOPs utilisation against the card's measured bf16 matmul
rate, and the time of one 25,000-review epoch, with the card's name.

    python -m bench.gpu_train                # on a machine with a CUDA GPU
    python -m bench.gpu_train --rows 256 --steps 4 --small    # a quick check of the script on a CPU
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import polars as pl
import torch

from bench.common import forward_flops

ROOT = os.path.join(os.path.dirname(__file__), "..")


def generated_reviews(rows, seed=0):
    """Reviews of made-up words (one token each) with IMDb-like lengths: lognormal, median ~230 tokens."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(20000)])
    lengths = np.clip(rng.lognormal(np.log(230), 0.75, rows).astype(int), 10, 2500)
    texts = [" ".join(rng.choice(words, n)) for n in lengths]
    return pl.DataFrame({"review": texts, "sentiment": rng.choice(["negative", "positive"], rows)})


def build_model_folder(folder, texts, small):
    from transformers import AutoModelForSequenceClassification, DistilBertConfig

    from sentiment.modeling import train_tiny_tokenizer
    tokenizer = train_tiny_tokenizer(texts, vocab_size=30522)
    shape = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128) if small else {}  # default: the seed architecture
    config = DistilBertConfig(vocab_size=len(tokenizer), num_labels=2, **shape)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config, tokenizer


def bf16_matmul_rate(n=8192, seconds=2.0):
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    torch.cuda.synchronize()
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        rounds += 1
    torch.cuda.synchronize()
    return rounds * 2 * n ** 3 / (time.perf_counter() - start)


def run_ours(data, folder, out, batch_size, steps, precision):
    flags = ["--data", data, "--val-size", "0", "--test-size", "0", "--model", folder, "--output-dir", out,
             "--overwrite", "--max-length", "512", "--batch-size", str(batch_size), "--epochs", "1",
             "--mixed-precision", precision, "--checkpoint-every", "0", "--truncation", "head"]
    if steps:
        flags += ["--max-steps", str(steps)]
    subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return metrics["train_seconds"], metrics["train_samples_per_second"]


def run_trainer(frame, folder, batch_size, steps, precision):
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(frame["review"].to_list(), truncation=True, max_length=512)
    labels = (frame["sentiment"] == "positive").cast(int).to_list()
    rows = [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size,
                             num_train_epochs=1, max_steps=steps or -1, bf16=precision == "bf16",
                             save_strategy="no", report_to=[], disable_tqdm=True, logging_strategy="no",
                             use_cpu=not torch.cuda.is_available())
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train()
    return result.metrics["train_runtime"], result.metrics["train_samples_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25000, help="Generated reviews (one epoch).")
    parser.add_argument("--batch-size", type=int, default=32, help="Per-device batch of both trainers.")
    parser.add_argument("--steps", type=int, default=0, help="Stop after this many steps (0: the whole epoch).")
    parser.add_argument("--small", action="store_true", help="A tiny DistilBERT, to check the script on a CPU.")
    args = parser.parse_args()
    precision = "bf16" if torch.cuda.is_available() else "no"

    work = tempfile.mkdtemp()
    frame = generated_reviews(args.rows)
    data, folder = os.path.join(work, "reviews.csv"), os.path.join(work, "model")
    frame.write_csv(data)
    config, tokenizer = build_model_folder(folder, frame["review"].to_list(), args.small)
    lengths = [min(len(i), 512) for i in tokenizer(frame["review"].to_list(), add_special_tokens=True)["input_ids"]]
    tokens, flops = sum(lengths), 3 * forward_flops(config, lengths)  # forward + backward ≈ 3 forwards
    rate = bf16_matmul_rate()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"card: {card}; bf16 matmul rate {rate / 1e12:.0f} TFLOP/s; {args.rows} reviews, "
          f"{tokens / args.rows:.0f} tokens each on average at max length 512; batch {args.batch_size}; {precision}")
    print(f"{'trainer':<10} {'tokens/s':>10} {'samples/s':>10} {'MFU':>6} {'epoch s':>8}")
    results = {}
    for name, run in (("ours", lambda: run_ours(data, folder, os.path.join(work, "out"), args.batch_size,
                                                args.steps, precision)),
                      ("Trainer", lambda: run_trainer(frame, folder, args.batch_size, args.steps, precision))):
        seconds, samples_per_second = run()
        results[name] = samples_per_second
        per_sample = tokens / args.rows
        print(f"{name:<10} {samples_per_second * per_sample:>10.0f} {samples_per_second:>10.1f} "
              f"{samples_per_second * flops / args.rows / rate:>6.1%} {args.rows / samples_per_second:>8.1f}",
              flush=True)
    print(f"ours / Trainer: {results['ours'] / results['Trainer']:.2f}x samples/s")


if __name__ == "__main__":
    main()
