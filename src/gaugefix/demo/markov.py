"""Random Markov languages: a second generated corpus, unlike the demo grammar.

A language is a sparse random first-order chain over ``n_words`` words: every word can be
followed by ``branching`` others, with Dirichlet weights. Documents are ``<bos>`` + a chain of
geometric length + ``<eos>``. A fine-tuning run speaks a *dialect*: a fraction ``shift`` of the
words have their successors and weights re-drawn (seeded by the dialect), so two runs from one
base drift apart in ways the demo grammar's mixtures do not. Nothing here is tuned to an
estimator; the language is drawn from its seed alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .corpus import SPECIALS, Corpus


@dataclass
class MarkovCorpus(Corpus):
    """A random Markov language (``seed``) and its dialects, word-level tokenised."""

    n_words: int = 120
    branching: int = 6
    mean_length: float = 40.0
    seed: int = 0
    vocab: list[str] = field(default_factory=list)

    # what the two fine-tuning runs of a lineage speak (see ``stream``'s ``mix``)
    run_mixes = ({"dialect": 1.0, "shift": 0.35}, {"dialect": 2.0, "shift": 0.35})

    def __post_init__(self) -> None:
        self.vocab = SPECIALS + [f"w{i}" for i in range(self.n_words)]
        super().__post_init__()
        self._tables: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}

    def _table(self, dialect: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """(successors, cumulative weights), each ``n_words × branching``."""
        key = (dialect, shift)
        if key not in self._tables:
            rng = np.random.default_rng(self.seed)
            succ = np.stack([rng.choice(self.n_words, self.branching, replace=False)
                             for _ in range(self.n_words)])
            w = rng.dirichlet(np.full(self.branching, 0.5), size=self.n_words)
            if dialect:
                drng = np.random.default_rng([self.seed, dialect])
                rows = drng.choice(self.n_words, round(shift * self.n_words),
                                   replace=False)
                for r in rows:
                    succ[r] = drng.choice(self.n_words, self.branching, replace=False)
                    w[r] = drng.dirichlet(np.full(self.branching, 0.5))
            self._tables[key] = (succ, np.cumsum(w, axis=1))
        return self._tables[key]

    def stream(self, n_tokens: int, seed: int, mix: Mapping[str, float] | None = None
               ) -> np.ndarray:
        """``n_tokens`` ids of documents in the base language, or, with ``mix`` =
        ``{"dialect": k, "shift": f}``, in dialect k (a fraction f of the words re-drawn)."""
        mix = dict(mix or {})
        succ, cum = self._table(int(mix.get("dialect", 0)), float(mix.get("shift", 0.0)))
        rng = np.random.default_rng([self.seed, seed])
        offset = len(SPECIALS)
        out = np.empty(n_tokens + 2 * int(self.mean_length) * 8, dtype=np.int64)
        n = 0
        while n < n_tokens:
            length = int(rng.geometric(1.0 / self.mean_length))
            u = rng.random(length)
            word = int(rng.integers(self.n_words))
            doc = [self.bos_id]
            for k in range(length):
                doc.append(offset + word)
                word = int(succ[word, min(int(np.searchsorted(cum[word], u[k] * cum[word, -1])),
                                          self.branching - 1)])
            doc.append(self.eos_id)
            if n + len(doc) > len(out):
                out = np.concatenate([out, np.empty(len(doc) + n_tokens, dtype=np.int64)])
            out[n:n + len(doc)] = doc
            n += len(doc)
        return out[:n_tokens].copy()
