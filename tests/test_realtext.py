"""Real English text offline (gaugefix.demo.realtext): CPython's own documentation, the same
for the same Python, prose only, split and tokenised as the pretrained-model experiments use
it."""

from __future__ import annotations

import numpy as np
import pytest

from gaugefix.demo.realtext import RealText, _is_prose, concatenated, python_docs


def test_python_docs_are_prose_and_the_same_every_time():
    text = python_docs(max_bytes=200_000)
    again = python_docs.__wrapped__(max_bytes=200_000)  # not the cached object
    assert text.digest == again.digest and text.documents == again.documents
    assert 200_000 <= text.n_bytes < 300_000 and len(text.documents) > 20
    assert "CPython" in text.source and "documentation" in text.source
    for doc in text.documents:
        assert len(doc) >= 200 and _is_prose(doc), doc[:80]
        assert not any(p.startswith(">>>") or "****" in p for p in doc.split("\n\n"))
    words = " ".join(text.documents).lower().split()
    assert {"the", "and", "of", "is"} <= set(words)  # ordinary English function words
    assert len(set(text.documents)) == len(text.documents)


def test_the_split_is_seeded_disjoint_and_whole():
    text = python_docs(max_bytes=100_000)
    train, held = text.split(0.2, seed=3)
    assert set(train.documents).isdisjoint(held.documents)
    assert sorted(train.documents + held.documents) == sorted(text.documents)
    assert text.split(0.2, seed=3)[1].documents == held.documents
    assert text.split(0.2, seed=4)[1].documents != held.documents
    assert "held-out" in held.source
    with pytest.raises(ValueError):
        text.split(1.0, seed=0)


class _Words:
    """A stand-in tokenizer: one id per word (its length)."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [len(w) for w in text.split()]}


def test_tokens_follow_the_documents_with_eos_between_them():
    text = RealText(("one two three", "four five"), "test")
    ids = text.tokens(_Words(), 100)
    assert ids.tolist() == [3, 3, 5, 0, 4, 4, 0] and ids.dtype == np.int64
    assert text.tokens(_Words(), 4).tolist() == [3, 3, 5, 0]
    both = concatenated([text, RealText(("six",), "more")])
    assert both.documents[-1] == "six" and both.source == "test + more"
