"""Memory of the tokenised training data: token ids packed in one int32 array (`TokenIds`, what
training and the Predictor use) against lists of Python ints (what a tokenizer returns), same
texts, in one run. Python allocations are counted with tracemalloc (numpy's included).

    python -m bench.token_memory          # the IMDb train file at max length 512, about a minute
"""

import argparse
import tracemalloc

import polars as pl
from transformers import AutoTokenizer

from bench.common import DATA, cpu_description, minilm_folder
from sentiment.batching import ENCODE_CHUNK, encode, special_tokens, truncate
from sentiment.data import clean_texts


def as_lists(tokenizer, texts, max_length):
    """The same ids as `encode(…, "head+tail")`, kept as lists of Python ints."""
    prefix, suffix = special_tokens(tokenizer)
    budget, ids = max_length - len(prefix) - len(suffix), []
    for start in range(0, len(texts), ENCODE_CHUNK):
        bare = tokenizer(texts[start:start + ENCODE_CHUNK], add_special_tokens=False)["input_ids"]
        ids += [prefix + truncate(one, budget, "head+tail") + suffix for one in bare]
    return ids


def measured(build):
    tracemalloc.start()
    result = build()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, held / 2**20, peak / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--max-length", type=int, default=512, help="Tokens kept per review.")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    texts = clean_texts(pl.read_csv(args.data)["review"].to_list())
    packed, packed_mib, packed_peak = measured(lambda: encode(tokenizer, texts, args.max_length, "head+tail"))
    lists, lists_mib, lists_peak = measured(lambda: as_lists(tokenizer, texts, args.max_length))
    assert all(packed[i].tolist() == lists[i] for i in range(len(lists)))  # the same ids
    tokens = int(packed.lengths.sum())
    print(f"{cpu_description()}; {len(texts)} reviews, {tokens} tokens at max length {args.max_length}")
    print(f"{'ids as':28} {'held MiB':>9} {'bytes/token':>12} {'peak MiB':>9}")
    for name, held, peak in (("one int32 array (TokenIds)", packed_mib, packed_peak),
                             ("lists of Python ints", lists_mib, lists_peak)):
        print(f"{name:28} {held:>9.0f} {held * 2**20 / tokens:>12.1f} {peak:>9.0f}")
    print(f"lists / packed, held: {lists_mib / packed_mib:.1f}x")


if __name__ == "__main__":
    main()
