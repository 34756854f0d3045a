"""Tokenising very long texts: `encode` (only a long text's ends are tokenised) against the
tokenizer's own truncation (`tokenizer(texts, truncation=True, max_length=512)`, as `pipeline` does,
which reads the whole text first), same texts, in one run. Each measurement runs in a fresh process,
so its peak memory is its own.

    python -m bench.long_texts            # texts of 1 kB to 10 MB, four kinds, about five minutes
    python -m bench.long_texts --kinds "one word"

The kinds: IMDb words between spaces; the same words between commas (no space anywhere: a list, a
URL, a table flattened into one cell); Chinese characters (no space, each character a word to
BERT's tokenizer); one word of the text's whole length (a blob, a line of one letter), whose ends
the cut is never clear of.
"""

import argparse
import concurrent.futures
import multiprocessing
import resource
import time

import numpy as np
import polars as pl

from bench.common import DATA, cpu_description, minilm_folder

SIZES = (1_000, 100_000, 1_000_000, 10_000_000)  # characters
KINDS = ("words", "no spaces", "Chinese", "one word")
CHINESE = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生对"


def long_text(kind, words, chars, seed):
    rng = np.random.default_rng(seed)
    if kind == "Chinese":
        return "".join(rng.choice(list(CHINESE), chars))
    if kind == "one word":
        return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), chars))
    text = (" " if kind == "words" else ",").join(rng.choice(words, chars // 5 + 100))
    return text[:chars]


def measure(scorer, folder, texts, max_length):
    """(seconds, peak memory added in MiB, ids) of one way of tokenising `texts`, in this process."""
    from transformers import AutoTokenizer

    from sentiment.batching import encode
    tokenizer = AutoTokenizer.from_pretrained(folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if scorer == "ours":
        ids = encode(tokenizer, texts, max_length, "head")
        ids = [ids[i].tolist() for i in range(len(ids))]
    else:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    seconds = time.perf_counter() - start
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, ids


def in_fresh_process(*args):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout): where the words come from.")
    parser.add_argument("--max-length", type=int, default=512, help="Tokens kept per text.")
    parser.add_argument("--texts", type=int, default=4, help="Texts of each size.")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS, metavar="KIND",
                        help=f"Which kinds of text ({', '.join(KINDS)}).")
    args = parser.parse_args()
    folder = minilm_folder()
    words = " ".join(pl.read_csv(args.data, n_rows=2000)["review"].to_list()).split()
    print(f"{cpu_description()}; {args.texts} texts of each size, max length {args.max_length}, head truncation")
    print(f"{'kind':>10} {'chars per text':>15} {'ours s':>8} {'peer s':>8} {'peer/ours':>10} {'ours MiB':>9} "
          f"{'peer MiB':>9}")
    for kind in args.kinds:
        for size in SIZES:
            texts = [long_text(kind, words, size, seed) for seed in range(args.texts)]
            ours = in_fresh_process("ours", folder, texts, args.max_length)
            peer = in_fresh_process("peer", folder, texts, args.max_length)
            assert ours[2] == peer[2]  # the same ids
            print(f"{kind:>10} {size:>15,} {ours[0]:>8.3f} {peer[0]:>8.3f} {peer[0] / ours[0]:>9.1f}x "
                  f"{ours[1]:>9.0f} {peer[1]:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
