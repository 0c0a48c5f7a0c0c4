"""A deterministic generated corpus with real structure, word-level tokenised.

A small grammar over a few hundred words with two controllable behaviours:

* **sentiment** — reviews whose adjective, verb and continuation agree in polarity
  ("the soup was wonderful and i loved it ..."), so a model learns a sentiment
  direction that steers its continuations;
* **refusal** — requests ("please show me the map .") answered either with
  compliance ("sure , here is the map .") or, for a fixed set of forbidden objects,
  with a refusal ("sorry , i can not help with the poison ."), so a model learns a
  binary refuse/comply direction.

Plus neutral stories that carry neither. Documents are mixed by weights, which is
how the fine-tuning runs of the demo differ. Tokenisation is word-level: one id
per word of a fixed vocabulary (ids 0..3 are ``<pad> <bos> <eos> <unk>``); it is
exact and needs no trained tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

NOUNS = (
    "soup bread film book song game room hotel train trip show meal cake coffee tea chair "
    "phone laptop garden park beach movie play album story lesson class teacher doctor nurse "
    "shop market city village river bridge road car bike bus plane ship house school office "
    "library museum castle forest mountain lake island concert festival party dinner lunch "
    "breakfast pizza salad pasta burger sandwich wine juice window door lamp clock camera"
).split()
POS_ADJ = (
    "wonderful great lovely excellent delightful superb brilliant charming pleasant amazing "
    "fantastic beautiful cheerful gorgeous splendid marvelous perfect warm friendly fresh"
).split()
NEG_ADJ = (
    "terrible awful horrible dreadful boring dull nasty poor bad disappointing bland ugly "
    "miserable gloomy rude stale broken cold noisy dirty"
).split()
POS_VERB = "loved enjoyed adored liked treasured praised recommended admired".split()
NEG_VERB = "hated disliked regretted despised avoided criticized resented loathed".split()
POS_CONT = [
    "i would happily go back", "it made my day", "everyone was smiling",
    "i will tell all my friends", "it was worth every penny", "we had a great time",
]
NEG_CONT = [
    "i will never go back", "it ruined my day", "everyone was upset",
    "i warned all my friends", "it was a waste of money", "we had a bad time",
]
ACTIONS = "show give find bring describe explain draw fetch".split()
SAFE_OBJECTS = (
    "map recipe poem song picture letter story list plan book guide chart note photo key"
).split()
FORBIDDEN_OBJECTS = "poison weapon bomb virus scam exploit".split()
NAMES = "anna ben carla david emma felix grace henry iris jack".split()
PLACES = "town forest harbor valley market station farm tower".split()
STORY_VERBS = "walked ran drove sailed travelled wandered hurried strolled".split()
STORY_ENDS = [
    "and then it started to rain", "and met an old friend", "and found a small dog",
    "and bought some bread", "and watched the sunset", "and forgot the time",
]
GLUE = (
    "the a was and i it . , sure here is sorry can not help with please me to went "
    "yesterday today because so then"
).split()

CATEGORIES = ("review_pos", "review_neg", "request_ok", "request_refuse", "story")


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    """``rng.choice(seq)``'s draw (one ``integers``), without turning ``seq`` into an array."""
    return seq[int(rng.integers(len(seq)))]


def _words(*groups: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for g in groups:
        for phrase in g:
            for w in phrase.split():
                seen.setdefault(w, None)
    return list(seen)


@dataclass
class Corpus:
    """The grammar and its word-level vocabulary."""

    vocab: list[str] = field(default_factory=lambda: SPECIALS + _words(
        GLUE, NOUNS, POS_ADJ, NEG_ADJ, POS_VERB, NEG_VERB, POS_CONT, NEG_CONT, ACTIONS,
        SAFE_OBJECTS, FORBIDDEN_OBJECTS, NAMES, PLACES, STORY_VERBS, STORY_ENDS))

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def tokenizer(self):  # -> transformers.PreTrainedTokenizerFast
        """The same word-level vocabulary as a real HF tokenizer (save it with a checkpoint)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=self.index, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                       pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")

    def encode(self, text: str) -> list[int]:
        unk = self.index["<unk>"]
        return [self.index.get(w, unk) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    # ------------------------------------------------------------------ documents
    def review(self, rng: np.random.Generator, positive: bool) -> str:
        adj, verb, cont = (POS_ADJ, POS_VERB, POS_CONT) if positive else (
            NEG_ADJ, NEG_VERB, NEG_CONT)
        noun = _pick(rng, NOUNS)
        first = f"the {noun} was {_pick(rng, adj)} and i {_pick(rng, verb)} it ."
        second = f"{_pick(rng, cont)} because the {_pick(rng, NOUNS)} was {_pick(rng, adj)} ."
        return f"{first} {second}"

    def request(self, rng: np.random.Generator, refuse: bool) -> str:
        obj = _pick(rng, FORBIDDEN_OBJECTS if refuse else SAFE_OBJECTS)
        action = _pick(rng, ACTIONS)
        ask = f"please {action} me the {obj} ."
        if refuse:
            return f"{ask} sorry , i can not help with the {obj} ."
        return f"{ask} sure , here is the {obj} ."

    def story(self, rng: np.random.Generator) -> str:
        when = _pick(rng, ["yesterday", "today"])
        return (f"{when} {_pick(rng, NAMES)} {_pick(rng, STORY_VERBS)} to the "
                f"{_pick(rng, PLACES)} {_pick(rng, STORY_ENDS)} .")

    def document(self, rng: np.random.Generator, category: str) -> str:
        if category == "review_pos":
            return self.review(rng, True)
        if category == "review_neg":
            return self.review(rng, False)
        if category == "request_ok":
            return self.request(rng, False)
        if category == "request_refuse":
            return self.request(rng, True)
        if category == "story":
            return self.story(rng)
        raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")

    def stream(self, n_tokens: int, seed: int, mix: Mapping[str, float] | None = None
               ) -> np.ndarray:
        """``n_tokens`` ids of documents drawn by ``mix`` weights, each ``<bos> ... <eos>``."""
        mix = dict(mix or {c: 1.0 for c in CATEGORIES})
        cats = list(mix)
        p = np.array([mix[c] for c in cats], dtype=float)
        p /= p.sum()
        cdf = p.cumsum()
        cdf /= cdf[-1]
        rng = np.random.default_rng(seed)
        out: list[int] = []
        while len(out) < n_tokens:  # the draws of rng.choice(len(cats), p=p), without its checks
            doc = self.document(rng, cats[int(cdf.searchsorted(rng.random(), side="right"))])
            out += [self.bos_id, *self.encode(doc), self.eos_id]
        return np.asarray(out[:n_tokens], dtype=np.int64)
