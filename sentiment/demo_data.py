"""Generated movie reviews for the offline demo and the tests.

The sentiment is carried by the choice of words, with enough filler, HTML breaks and varied
lengths that the whole pipeline (cleaning, truncation, length grouping) gets real work, yet
a tiny model learns it in a few hundred steps. No downloads, fully determined by the seed.
"""

import numpy as np
import polars as pl

WORDS = {
    "positive": ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping",
                 "beautiful", "hilarious", "masterful"],
    "negative": ["dreadful", "boring", "clumsy", "tedious", "awful", "lifeless", "painful",
                 "shallow", "predictable", "forgettable"],
}
VERDICTS = {
    "positive": ["I loved it.", "Highly recommended.", "I would watch it again.", "A real treat."],
    "negative": ["I hated it.", "Avoid it.", "A waste of an evening.", "I want my money back."],
}
SUBJECTS = ["the film", "the plot", "the acting", "the script", "the score", "the ending", "the cast",
            "the director's work", "the photography", "the pacing"]
FILLER = ["We saw it on a Sunday afternoon.", "It runs a little over two hours.",
          "The story is set in a small coastal town.", "My friend had read the novel first.",
          "It was shown in a half-empty cinema.", "The trailer gives away very little.",
          "Several scenes were shot at night.", "It is the second film of its director."]


def demo_review(rng, label):
    sentences = []
    for _ in range(rng.integers(1, 4)):
        sentences.append(f"{SUBJECTS[rng.integers(len(SUBJECTS))].capitalize()} was "
                         f"{WORDS[label][rng.integers(len(WORDS[label]))]}.")
        sentences.extend(rng.choice(FILLER, size=rng.integers(0, 4), replace=False).tolist())
    rng.shuffle(sentences)
    sentences.append(VERDICTS[label][rng.integers(len(VERDICTS[label]))])
    return " <br /><br />".join(sentences) if rng.random() < 0.3 else " ".join(sentences)


def demo_reviews(n, seed=0):
    """A frame of `n` generated reviews in the IMDb layout: columns `review` and `sentiment`."""
    rng = np.random.default_rng(seed)
    labels = ["positive" if i % 2 else "negative" for i in range(n)]
    rng.shuffle(labels)
    return pl.DataFrame({"review": [demo_review(rng, label) for label in labels], "sentiment": labels})
