import numpy as np
import pytest

from sentiment.batching import Collator, LengthGroupedBatches, encode, special_tokens, truncate
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
