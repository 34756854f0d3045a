import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sentiment import batching
from sentiment.batching import (CUT_CHARS_PER_TOKEN, TRUNCATIONS, Collator, LengthGroupedBatches, encode,
                                special_tokens, truncate)
from sentiment.demo_data import demo_reviews
from sentiment.errors import SettingError
from sentiment.modeling import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer([f"word{i} another text here" for i in range(200)], vocab_size=300)


@pytest.mark.parametrize("truncation, expected", [
    ("head", list(range(8))),
    ("tail", list(range(12, 20))),
    ("head+tail", [0, 1, 14, 15, 16, 17, 18, 19]),  # a quarter of 8 from the head, the rest from the tail
])
def test_truncation_keeps_the_chosen_ends(truncation, expected):
    assert truncate(list(range(20)), 8, truncation) == expected
    assert truncate(list(range(5)), 8, truncation) == list(range(5))


def test_encode_adds_special_tokens_around_the_truncated_text(tokenizer):
    prefix, suffix = special_tokens(tokenizer)
    assert prefix == [tokenizer.cls_token_id] and suffix == [tokenizer.sep_token_id]
    long_text = " ".join(f"word{i}" for i in range(100))
    full = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    ids = encode(tokenizer, [long_text, "another"], 16, "head+tail")
    assert ids.lengths.tolist() == [16, len(tokenizer("another")["input_ids"])]
    assert ids[0].tolist() == prefix + full[:3] + full[-11:] + suffix
    assert ids[1].tolist() == prefix + tokenizer("another", add_special_tokens=False)["input_ids"] + suffix
    assert ids.tokens.dtype == np.int32 and len(encode(tokenizer, [], 16, "head")) == 0


def byte_level_bpe(texts):
    """A RoBERTa-like tokenizer: byte-level BPE, the space carried by the word after it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")


def metaspace_unigram(texts):
    """A SentencePiece-like tokenizer: unigram pieces, spaces turned into a leading `▁`."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"],
                                                               unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", unk_token="<unk>")


class Recording:
    """A tokenizer that remembers the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, [texts] if isinstance(texts, str) else texts)])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def word_across_the_cut(chars, rest, end):
    """A text whose first (or last) `chars` characters end (or begin) 99 characters into a word of 250:
    WordPiece makes the whole word one [UNK] (over 100 characters) but its 99 characters many tokens,
    and the few words beside them (one [UNK] each) leave those tokens among the kept ones."""
    few = ("x" * 300 + " ") * (chars // 300 + 1)
    word = "a" * 250
    near = few[:chars - 100]
    return near + " " + word + " " + rest if end == "first" else rest + " " + word + " " + near


@pytest.mark.parametrize("kind", ["wordpiece", "byte-level BPE", "unigram"])
def test_only_the_ends_of_a_huge_text_are_tokenised_and_the_kept_tokens_are_the_same(tokenizer, kind):
    # The tokenizer reads a whole text before truncating: 26 s and 4 GB for a 24 MB review of which
    # 510 tokens were kept.
    rng = np.random.default_rng(5)
    reviews = demo_reviews(200, seed=5)["review"].to_list()
    tok = {"wordpiece": lambda: tokenizer, "byte-level BPE": lambda: byte_level_bpe(reviews),
           "unigram": lambda: metaspace_unigram(reviews)}[kind]()
    max_length = 40
    prefix, suffix = special_tokens(tok)
    budget = max_length - len(prefix) - len(suffix)
    words = " ".join(reviews).split(" ")
    huge = [" ".join(rng.choice(words, 3000)),
            "  ".join(rng.choice(words, 3000)) + ", the end.",  # runs of spaces at the cuts
            " ".join(rng.choice(words, 1500)) + "\n" + " ".join(rng.choice(words, 1500)),
            ",".join(rng.choice(words, 3000)),  # no space at all: words split at the commas
            "".join(rng.choice(list("好的电影很糟糕演员"), 20000)),  # no space: BERT makes each CJK character a word
            word_across_the_cut(budget * CUT_CHARS_PER_TOKEN, " ".join(rng.choice(words, 3000)), "first"),
            word_across_the_cut(budget * CUT_CHARS_PER_TOKEN, " ".join(rng.choice(words, 3000)), "last"),
            " ".join(["x" * 300] * 20),  # few tokens for its length (WordPiece: one [UNK] a word)
            "short one"]
    for truncation in TRUNCATIONS:
        ids = encode(tok, huge, max_length, truncation)
        for i, text in enumerate(huge):
            whole = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[i].tolist() == prefix + truncate(whole, budget, truncation) + suffix, (truncation, i)
        # Where words split without spaces, a text without any is cut as cheaply as one with them.
        cheap = {"wordpiece": huge[:5], "byte-level BPE": huge[:4], "unigram": huge[:3]}[kind]
        recording = Recording(tok)
        encode(recording, cheap, max_length, truncation)
        assert recording.longest <= budget * CUT_CHARS_PER_TOKEN < min(map(len, cheap)) / 10
    if kind == "wordpiece":  # the checks that send them whole are what keep their tokens right
        for text, truncation in zip(huge[5:8], ["head", "tail", "head"]):
            recording = Recording(tok)
            encode(recording, [text], max_length, truncation)
            assert recording.longest == len(text)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_a_huge_text_cut_inside_a_word_is_tokenised_from_its_ends_alone(tokenizer, monkeypatch, truncation):
    # Its ends cut inside its one word, a text was tokenised whole however long: a 100 MB line without a space
    # took 53 s and 6.5 GB to keep 510 tokens.
    monkeypatch.setattr(batching, "WHOLE_CHARS", 20_000)
    max_length = 40
    prefix, suffix = special_tokens(tokenizer)
    huge, long = "a" * 60_000 + " word1 here", "a" * 15_000 + " word1 here"
    recording = Recording(tokenizer)
    ids = encode(recording, [huge], max_length, truncation)
    assert recording.longest == 10_000  # an end of half WHOLE_CHARS, not the 60,000 characters
    unknown = tokenizer.unk_token_id  # WordPiece's token for a word of over 100 characters
    tail = tokenizer("a" * 9_989 + " word1 here", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == prefix + {"head": [unknown], "tail": tail, "head+tail": [unknown, *tail]}[truncation] \
        + suffix
    recording = Recording(tokenizer)
    ids = encode(recording, [long], max_length, truncation)  # up to WHOLE_CHARS, still the whole text's tokens
    assert recording.longest == len(long)
    whole = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == prefix + truncate(whole, max_length - len(prefix) - len(suffix), truncation) + suffix


def test_length_grouped_batches_cover_every_index_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    batches = LengthGroupedBatches(lengths, batch_size=16, seed=1, group=10)
    order = list(batches)
    assert len(order) == len(batches) == 63
    assert sorted(i for b in order for i in b) == list(range(1000))
    waste = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in order) / lengths.sum()
    random_waste = sum(16 * lengths[b].max() - lengths[b].sum() for b in np.array_split(rng.permutation(1000), 63))
    assert waste < 0.1 < random_waste / lengths.sum()
    # Random across batches, reproducible from the seed, different each epoch.
    assert [len(b) for b in order[:-1]] == [16] * 62 and len(order[-1]) == 1000 - 62 * 16
    assert not all(lengths[a].max() >= lengths[b].max() for a, b in zip(order, order[1:]))
    assert order == list(LengthGroupedBatches(lengths, batch_size=16, seed=1, group=10))
    batches.epoch = 1
    assert list(batches) != order


def test_collator_pads_to_the_longest_and_masks_padding():
    batch = Collator(pad_id=0, multiple_of=4)([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    full = Collator(pad_id=0, multiple_of=1)([{"input_ids": [5, 6]}, {"input_ids": [7, 8]}])
    assert full["attention_mask"].tolist() == [[1, 1], [1, 1]]  # a mask all the same: one graph when compiled


def test_an_unknown_truncation_is_refused():
    with pytest.raises(SettingError, match="truncation: 'middle' is not one of head, tail, head\\+tail"):
        truncate(list(range(10)), 4, "middle")


def test_the_batch_with_the_longest_text_comes_first_in_every_epoch():
    lengths = np.random.default_rng(0).integers(5, 300, size=333)
    batches = LengthGroupedBatches(lengths, batch_size=8, seed=3)
    for epoch in range(3):
        batches.epoch = epoch
        order = list(batches)
        assert lengths[order[0]].max() == lengths.max()
        assert sorted(i for b in order for i in b) == list(range(333)) and len(order[-1]) == 333 % 8
