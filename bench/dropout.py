"""Attention dropout on a CPU: training steps with the model's own rate (0.1) against 0, in one run.

With dropout on the attention weights, PyTorch's scaled-dot-product attention falls back to its
unfused path on a CPU: it builds every (length x length) weight matrix, draws a dropout mask for
it one element at a time, and asks the kernel for fresh zeroed pages each step. With the rate at 0
the fused kernel runs instead. Same model (all-MiniLM-L6-v2), reviews (the first 400 of the IMDb
CSV), length (512, head+tail), batch 16, AdamW, bf16 autocast where the CPU has AVX512-BF16.

    python -m bench.dropout [--data ../shared/data/imdb_train_25k.csv] [--steps 12] [--max-length 512]
"""

import argparse
import json
import time

import torch

from bench.common import DATA, cpu_description, imdb_rows, minilm_folder
from sentiment.batching import Collator, LengthGroupedBatches, encode
from sentiment.data import clean_texts
from sentiment.devices import cpu_has_bf16
from sentiment.modeling import load_model


def samples_per_second(ids, attention_dropout, steps, bf16):
    """Training samples/s over `steps` length-grouped batches of 16 (two warm-up steps not counted)."""
    torch.manual_seed(0)
    model = load_model(minilm_folder(), ["negative", "positive"], 0, attention_dropout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate = Collator(0)
    batches = list(LengthGroupedBatches(ids.lengths, 16, seed=0))[:steps + 2]
    for n, batch_idx in enumerate(batches):
        if n == 2:
            start = time.perf_counter()
        batch = collate([{"input_ids": ids[i], "labels": i % 2} for i in batch_idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return 16 * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--steps", type=int, default=12, help="Timed training steps per setting.")
    parser.add_argument("--max-length", type=int, default=512, help="Longest input in tokens.")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    ids = encode(tokenizer, clean_texts(imdb_rows(args.data, first=400)["review"].to_list()), args.max_length,
                 "head+tail")
    bf16 = cpu_has_bf16()
    rates = {rate: samples_per_second(ids, rate, args.steps, bf16) for rate in (None, 0.0)}
    print(f"{cpu_description()}; torch {torch.__version__}; {'bf16 autocast' if bf16 else 'fp32'}; "
          f"max length {args.max_length}")
    print(f"attention dropout 0.1 (the model's): {rates[None]:.2f} samples/s")
    print(f"attention dropout 0:                {rates[0.0]:.2f} samples/s ({rates[0.0] / rates[None]:.2f}x)")
    print(json.dumps({"cpu": cpu_description(), "bf16": bf16, "max_length": args.max_length,
                      "samples_per_second": {"0.1": rates[None], "0": rates[0.0]}}))


if __name__ == "__main__":
    main()
