"""From cleaned texts to padded batches: tokenise once, truncate, group by length, pad.

`encode` tokenises a list of texts in batched calls of the fast tokenizer and keeps, for a
long text, its head, its tail or both (`TRUNCATIONS`; of a very long text only the ends are
tokenised, see `kept_tokens`); special tokens are added afterwards, so any tokenizer's own
template (BERT's [CLS] … [SEP], RoBERTa's <s> … </s>) is kept. The ids are packed into one array
(`TokenIds`). `LengthGroupedBatches` yields shuffled batches of similar lengths, so dynamic
padding (`Collator`) wastes little.
Training and inference both use these; nothing here knows about models or optimisers.
"""

import itertools

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TRUNCATIONS
from .errors import SettingError

ENCODE_CHUNK = 4096  # texts per tokenizer call: the ids of one call are Python lists, ten times the packed size
HEAD_SHARE = 0.25  # head+tail keeps this share of the budget from the start (128 of 510, as Sun et al.)
# A text longer than twice this many characters per kept token (32 kB for 510 tokens; English takes
# about 4.5 a token) has only its ends tokenised: far beyond any IMDb review (14 kB at most).
CUT_CHARS_PER_TOKEN = 32
CUT_MARGIN = 16  # tokens beyond those kept that a cut end must give
# A text whose cut ends are not clear of the words they cut is tokenised whole up to this many characters (about
# a second and 250 MB at a million); a longer one, from ends of half this each, whose tokens are then kept as they
# are: a 100 MB line without a space took 53 s and 6.5 GB whole. Only there may the kept tokens differ from the
# whole text's, in the words a cut went through.
WHOLE_CHARS = 1 << 20


def special_tokens(tokenizer):
    """The ids the tokenizer puts before and after a single text, found by encoding a probe."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def special_count(tokenizer):
    """How many ids the tokenizer puts around every text ([CLS] … [SEP]: 2): a text encoded to no more
    than these, the tokenizer kept nothing of."""
    return sum(map(len, special_tokens(tokenizer)))


def truncate(ids, budget, truncation):
    """Keep at most `budget` of `ids`: the first, the last, or the first quarter plus the last rest."""
    if truncation not in TRUNCATIONS:
        raise SettingError("truncation", f"{truncation!r} is not one of {', '.join(TRUNCATIONS)}")
    if len(ids) <= budget:
        return ids
    if truncation == "head":
        return ids[:budget]
    if truncation == "tail":
        return ids[len(ids) - budget:]
    head = int(budget * HEAD_SHARE)
    return ids[:head] + ids[len(ids) - (budget - head):]


class TokenIds:
    """Token id sequences packed into one int32 array, `ids[i]` a view of the i-th. As lists of
    Python ints they took 8.4 times the memory (the IMDb train file: 253 MiB against 30, measured by
    bench/token_memory.py), and DataLoader workers copy such lists page by page as they touch
    their reference counts."""

    def __init__(self, tokens, lengths):
        self.tokens = tokens
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    @classmethod
    def pack(cls, sequences):
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        tokens = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum()))
        return cls(tokens, lengths)

    @classmethod
    def concatenate(cls, parts):
        return cls(np.concatenate([p.tokens for p in parts]), np.concatenate([p.lengths for p in parts]))

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def take(self, indices):
        """The sequences at `indices`, packed anew."""
        return TokenIds.pack([self[i] for i in indices])


def encode(tokenizer, texts, max_length, truncation, progress=None):
    """`TokenIds` (special tokens included) of each text, at most `max_length` long, tokenised in
    chunks; with `progress` (a label), under a progress bar."""
    prefix, suffix = special_tokens(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    texts, parts = list(texts), [TokenIds.pack([])]
    quiet = not progress or len(texts) <= ENCODE_CHUNK
    with tqdm(total=len(texts), desc=progress, unit=" texts", disable=quiet) as bar:
        for start in range(0, len(texts), ENCODE_CHUNK):
            kept = kept_tokens(tokenizer, texts[start:start + ENCODE_CHUNK], budget, truncation)
            parts.append(TokenIds.pack([prefix + one + suffix for one in kept]))
            bar.update(len(kept))
    return TokenIds.concatenate(parts)


def tokenize(tokenizer, texts):
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     verbose=False)["input_ids"]


def kept_tokens(tokenizer, texts, budget, truncation):
    """The ids `truncate` keeps of each text's tokens. Only the ends of a very long text are tokenised:
    the tokenizer reads a whole text before truncating, and a text of megabytes, of which 510 tokens
    are kept, cost seconds and gigabytes (bench/long_texts.py). The kept tokens are the whole text's:
    each end is cut at a fixed length, anywhere, even inside a word, and it is used only when every
    token kept of it comes from a word the cut left whole, with another whole word between them and
    the cut (`clear_of_the_cut`); otherwise the text is tokenised whole, up to WHOLE_CHARS."""
    if truncation not in TRUNCATIONS:
        raise SettingError("truncation", f"{truncation!r} is not one of {', '.join(TRUNCATIONS)}")
    head = {"head": budget, "tail": 0}.get(truncation, int(budget * HEAD_SHARE))
    tail = budget - head
    chars = budget * CUT_CHARS_PER_TOKEN
    # Word ids come with fast tokenizers only; a slow one tokenises every text whole.
    cut = [i for i, text in enumerate(texts) if len(text) > 2 * chars] if tokenizer.is_fast else []
    kept = [None] * len(texts)
    for i, first, last in cut_ends(tokenizer, texts, cut, chars):
        if clear_of_the_cut(first.word_ids, head, cut_after=True) and clear_of_the_cut(last.word_ids, tail,
                                                                                       cut_after=False):
            kept[i] = first.ids[:head] + last.ids[len(last.ids) - tail:]
    huge = [i for i in cut if kept[i] is None and len(texts[i]) > WHOLE_CHARS]
    for i, first, last in cut_ends(tokenizer, texts, huge, WHOLE_CHARS // 2):
        kept[i] = first.ids[:head] + last.ids[len(last.ids) - tail:]
    whole = [i for i, one in enumerate(kept) if one is None]
    for i, one in zip(whole, tokenize(tokenizer, [texts[i] for i in whole]) if whole else []):
        kept[i] = truncate(one, budget, truncation)
    return kept


def cut_ends(tokenizer, texts, which, chars):
    """(i, encoding of its first `chars` characters, of its last) for each text `i` in `which`."""
    ends = encodings(tokenizer, [piece for i in which for piece in (texts[i][:chars], texts[i][-chars:])])
    return zip(which, ends[::2], ends[1::2])


def encodings(tokenizer, texts):
    """The fast tokenizer's encodings (ids and word ids) of `texts`."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     verbose=False).encodings


def clear_of_the_cut(word_ids, count, cut_after):
    """Whether the `count` tokens kept from the far end of a cut piece (its first tokens when the cut is
    after them, its last when before) all belong to words the cut left whole, with a whole word and
    CUT_MARGIN tokens between them and the word the cut went through. A word's tokens depend on that
    word alone, and where words split depends only on the characters beside them, so such tokens are
    the ones the whole text gives."""
    if not count:
        return True
    if len(word_ids) < count + CUT_MARGIN or None in word_ids:
        return False
    if cut_after:
        return word_ids[count - 1] + 2 <= word_ids[-1]
    return word_ids[len(word_ids) - count] >= word_ids[0] + 2


class TokenizedDataset(torch.utils.data.Dataset):
    """`TokenIds` with optional integer labels; items are plain dicts for `Collator`."""

    def __init__(self, ids, labels=None):
        self.ids = ids
        self.labels = labels
        self.lengths = ids.lengths

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class Collator:
    """Pad a list of items to the longest in the batch, rounded up to `multiple_of` but no wider than `most`
    (the items are no longer than it). Every batch has an attention mask, padded or not: a compiled model
    (`accelerate launch --dynamo_backend inductor`) would compile a second graph for batches without one."""

    def __init__(self, pad_id, multiple_of=1, most=None):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.most = most

    def __call__(self, items):
        longest = max(len(item["input_ids"]) for item in items)
        width = -(-longest // self.multiple_of) * self.multiple_of
        width = min(width, self.most or width)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])  # a list or an int32 array
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items])
        return batch


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices of similar length, in a random order that `seed` and the epoch fix.

    Shuffle all indices, cut them into chunks of `group` batches, sort each chunk by length and
    cut it into batches, then shuffle the full batches (the short one, if any, comes last).
    Padding stays small; the order stays random across batches and changes with `epoch`, so
    resuming can replay it exactly. The batch holding the longest text comes first, so a batch too
    large for the device fails in the first step, not an hour in. The training loop sets `epoch`
    itself: Accelerate's own per-loader epoch counter restarts at 0 in a resumed run.
    """

    def __init__(self, lengths, batch_size, seed, group=50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches.extend(part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size))
        # The one short batch goes last: Accelerate's sharding across processes expects it there.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        order = rng.permutation(len(full))
        if len(order):  # the longest batch first: one too large for the device fails in the first step
            longest = int(np.argmax([self.lengths[b].max() for b in full]))
            order = [longest] + [i for i in order if i != longest]
        for i in order:
            yield full[i].tolist()
        for batch in short:
            yield batch.tolist()


def by_length(lengths):
    """Indices sorted longest first: for evaluation and inference, where order does not matter."""
    return np.argsort(-np.asarray(lengths), kind="stable")
