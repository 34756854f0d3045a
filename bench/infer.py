"""Scoring speed: the project's `Predictor` against `transformers.pipeline`, same model, rows and lengths.

Scores 1,000 real IMDb reviews (the CSV's last rows, which the benchmark model never trained
on) at max lengths 256 and 512 with pipeline(batch_size=1), pipeline(batch_size=32), the
Predictor (fp32), the Predictor with dynamic int8 quantisation, and with bf16 autocast; prints reviews/s, the ratio to
pipeline(batch_size=32), accuracy, and the fraction of this machine's compute limit reached.

    python -m bench.infer --model outputs/bench-train/same   # a model fine-tuned by bench/train.py
"""

import argparse
import os
import time

import numpy as np
import torch

from bench.common import DATA, cpu_description, forward_flops, imdb_rows, matmul_rate
from sentiment.data import clean_texts
from sentiment.predictor import Predictor


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_pipeline(model, texts, batch_size, max_length):
    from transformers import pipeline
    classify = pipeline("text-classification", model=model, device=-1)
    classify(texts[:4], batch_size=batch_size, truncation=True, max_length=max_length)  # warm-up
    answers, seconds = timed(lambda: classify(texts, batch_size=batch_size, truncation=True, max_length=max_length))
    return [a["label"] for a in answers], seconds


def run_predictor(model, texts, max_length, quantize=None, precision="fp32"):
    predictor = Predictor(model, max_length=max_length, quantize=quantize, precision=precision)
    predictor.probabilities(texts[:4])  # warm-up
    probs, seconds = timed(lambda: predictor.probabilities(texts))
    return [predictor.labels[i] for i in probs.argmax(1)], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/bench-train/same", help="A fine-tuned model folder.")
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--rows", type=int, default=1000, help="How many reviews to score.")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="Max lengths to measure.")
    parser.add_argument("--skip-batch-1", action="store_true", help="Leave out pipeline(batch_size=1) (slow).")
    args = parser.parse_args()

    frame = imdb_rows(args.data, last=args.rows)
    texts, truth = clean_texts(frame["review"].to_list()), frame["sentiment"].to_list()
    from transformers import AutoConfig, AutoTokenizer
    config, tokenizer = AutoConfig.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    rate = matmul_rate(config)
    print(f"machine: {cpu_description()}, {torch.get_num_threads()} threads, fp32; matmul rate on the model's shapes "
          f"{rate / 1e9:.0f} GFLOP/s; {args.rows} reviews from {os.path.basename(args.data)}")
    print(f"{'max len':>7} {'scorer':<24} {'reviews/s':>10} {'vs pipe32':>9} {'of limit':>9} {'accuracy':>9} "
          f"{'agree':>6}")
    for max_length in args.lengths:
        lengths = [len(i) for i in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        limit = rate / (forward_flops(config, lengths) / len(texts))
        runs = {}
        if not args.skip_batch_1:
            runs["pipeline(batch_size=1)"] = run_pipeline(args.model, texts, 1, max_length)
        runs["pipeline(batch_size=32)"] = run_pipeline(args.model, texts, 32, max_length)
        runs["Predictor fp32"] = run_predictor(args.model, texts, max_length)
        runs["Predictor int8"] = run_predictor(args.model, texts, max_length, quantize="int8")
        runs["Predictor bf16"] = run_predictor(args.model, texts, max_length, precision="bf16")
        base_labels, base_seconds = runs["pipeline(batch_size=32)"]
        for name, (labels, seconds) in runs.items():
            speed = len(texts) / seconds
            accuracy = np.mean([a == b for a, b in zip(labels, truth)])
            agree = np.mean([a == b for a, b in zip(labels, base_labels)])
            print(f"{max_length:>7} {name:<24} {speed:>10.1f} {base_seconds / seconds:>8.2f}x {speed / limit:>8.0%} "
                  f"{accuracy:>9.4f} {agree:>6.1%}", flush=True)
        print(f"{max_length:>7} {'compute limit':<24} {limit:>10.1f}")


if __name__ == "__main__":
    main()
