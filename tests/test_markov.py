"""The random Markov languages of the estimation benchmark: determined by their seed, and
their dialects differ from the base language in the stated share of words."""

from __future__ import annotations

import itertools

import numpy as np

from gaugefix.demo.corpus import SPECIALS
from gaugefix.demo.markov import MarkovCorpus


def _successors(ids: np.ndarray, n_special: int) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for x, y in itertools.pairwise(ids):
        if x >= n_special and y >= n_special:
            out.setdefault(int(x), set()).add(int(y))
    return out


def test_streams_are_determined_by_their_seeds_and_use_the_vocabulary():
    c = MarkovCorpus(seed=5)
    x = c.stream(5000, 1)
    assert np.array_equal(x, MarkovCorpus(seed=5).stream(5000, 1))
    assert not np.array_equal(x, MarkovCorpus(seed=6).stream(5000, 1))
    assert not np.array_equal(x, c.stream(5000, 2))
    assert x.dtype == np.int64 and len(x) == 5000
    assert x.min() >= 1 and x.max() < c.vocab_size and c.vocab_size == len(SPECIALS) + 120
    assert (x == c.bos_id).sum() == (x == c.eos_id).sum() + (x[-1] != c.eos_id)
    assert c.tokenizer()(c.decode(x[:30]))["input_ids"] == x[:30].tolist()


def test_a_dialect_redraws_the_stated_share_of_words():
    c = MarkovCorpus(seed=2, n_words=60, branching=3)
    base = _successors(c.stream(200_000, 0), len(SPECIALS))
    for k in (1, 2):
        dia = _successors(c.stream(200_000, 0, {"dialect": k, "shift": 0.5}), len(SPECIALS))
        words = sorted(set(base) & set(dia))
        changed = np.mean([base[w] != dia[w] for w in words])
        assert 0.35 <= changed <= 0.55, changed  # 30 of 60 re-drawn (a few redraw the same)
        assert all(len(s) <= 3 for s in dia.values())
