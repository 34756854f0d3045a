"""bf16 on a CPU that emulates it: training steps in fp32 and in bf16 autocast, in one run, with this
CPU's kernels and again limited to AVX2's (as on a CPU without AVX512-BF16 or AMX).

`accelerate_config.yaml` asks for bf16, and `train.py` warns where bf16 is emulated; this measures
what the warning is worth. The AVX2 run sets ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2 and
ATEN_CPU_CAPABILITY=avx2, so oneDNN, MKL and PyTorch's own kernels all keep to AVX2. Same model
(all-MiniLM-L6-v2), reviews (the first 200 of the IMDb CSV), length, batch 16, AdamW.

    python -m bench.bf16 [--data ../shared/data/imdb_train_25k.csv] [--steps 2] [--max-length 128]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import DATA, cpu_description, imdb_rows, minilm_folder
from sentiment.batching import Collator, encode
from sentiment.data import clean_texts
from sentiment.modeling import load_model

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def seconds_per_step(args, bf16):
    """Seconds per training step of batch 16 (one warm-up step not counted)."""
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    texts = clean_texts(imdb_rows(args.data, first=200)["review"].to_list())
    ids = encode(AutoTokenizer.from_pretrained(minilm_folder()), texts, args.max_length, "head+tail")
    model = load_model(minilm_folder(), ["negative", "positive"], 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate = Collator(0)
    for step in range(args.steps + 1):
        if step == 1:
            start = time.perf_counter()
        batch = collate([{"input_ids": ids[i], "labels": i % 2} for i in range(16 * step, 16 * step + 16)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / args.steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--steps", type=int, default=2, help="Timed training steps per setting.")
    parser.add_argument("--max-length", type=int, default=128, help="Longest input in tokens.")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one setting, in this process
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.one:
        print(json.dumps({"fp32": seconds_per_step(args, False), "bf16": seconds_per_step(args, True)}))
        return
    flags = ["--data", args.data, "--steps", str(args.steps), "--max-length", str(args.max_length), "--one"]
    print(f"{cpu_description()}; torch {torch.__version__}; all-MiniLM-L6-v2, batch 16, max length "
          f"{args.max_length}; seconds per training step")
    print(f"{'kernels':<22} {'fp32 s':>8} {'bf16 s':>8} {'bf16 / fp32':>12}")
    for name, env in (("this CPU's", {}), ("AVX2 only", AVX2_ONLY)):
        run = subprocess.run([sys.executable, "-m", "bench.bf16", *flags], env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.splitlines()[-1])
        print(f"{name:<22} {r['fp32']:>8.2f} {r['bf16']:>8.2f} {r['bf16'] / r['fp32']:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
