"""Steering on the generated corpus: add a residual direction, measure the concept it moves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..arch import detect_family
from .corpus import (
    ACTIONS,
    FORBIDDEN_OBJECTS,
    NEG_ADJ,
    NEG_VERB,
    NOUNS,
    POS_ADJ,
    POS_VERB,
    SAFE_OBJECTS,
    Corpus,
)
from .english import Concept


@contextlib.contextmanager
def steering(model: torch.nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` to the output of decoder layer ``layer`` (HF hidden_states[layer+1])."""
    layers = model.get_submodule(detect_family(model.config).layers)

    def hook(module: torch.nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, tuple):  # older transformers return tuples
            return (output[0] + vector.to(output[0]), *output[1:])
        return output + vector.to(output)  # type: ignore[operator]

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sentiment_prompts(corpus: Corpus, positive: bool, n: int = 48, seed: int = 0
                      ) -> torch.Tensor:
    """``<bos> the {noun} was {adj} and i`` — the next word (loved / hated ...) must carry
    the sentiment the adjective set up (equal lengths: the prompts batch without padding)."""
    rng = np.random.default_rng(seed)
    adjs = POS_ADJ if positive else NEG_ADJ
    return torch.tensor([[corpus.bos_id, *corpus.encode(
        f"the {rng.choice(NOUNS)} was {rng.choice(adjs)} and i")] for _ in range(n)])


def log_odds(model: torch.nn.Module, ids: torch.Tensor | Sequence[Sequence[int]],
             pos: Sequence[int], neg: Sequence[int]) -> torch.Tensor:
    """Per prompt: log P(next ∈ pos) − log P(next ∈ neg). ``ids``: a [n, L] batch, or prompts
    of any lengths (those of one length batch together, without padding)."""
    from ..audit import same_length_batches

    prompts = ids.tolist() if isinstance(ids, torch.Tensor) else [list(p) for p in ids]
    out = torch.empty(len(prompts), dtype=torch.float64)
    with torch.no_grad():
        for idx, batch in same_length_batches(model, prompts):
            logp = torch.log_softmax(model(batch).logits[:, -1].double(), -1).cpu()
            out[idx] = (torch.logsumexp(logp[:, list(pos)], -1)
                        - torch.logsumexp(logp[:, list(neg)], -1))
    return out


def contrast_direction(model: torch.nn.Module, positive: torch.Tensor | Sequence[Sequence[int]],
                       negative: torch.Tensor | Sequence[Sequence[int]], layer: int
                       ) -> torch.Tensor:
    """The contrastive (CAA-style) direction after decoder layer ``layer``: mean last-token
    state of the positive prompts minus that of the negative ones."""
    return (last_token_states(model, positive, layer).mean(0)
            - last_token_states(model, negative, layer).mean(0))


def steering_effect(model: torch.nn.Module, ids: torch.Tensor | Sequence[Sequence[int]],
                    up: Sequence[int],
                    down: Sequence[int], layer: int, vector: torch.Tensor) -> float:
    """Mean shift of log P(next ∈ up) − log P(next ∈ down) caused by adding ``vector``."""
    before = log_odds(model, ids, up, down)
    with steering(model, layer, vector):
        after = log_odds(model, ids, up, down)
    return float((after - before).mean())


def last_token_states(model: torch.nn.Module, ids: torch.Tensor | Sequence[Sequence[int]],
                      layer: int) -> torch.Tensor:
    """The residual after decoder layer ``layer`` at each prompt's last token."""
    from ..audit import last_token_states as at_position

    prompts = ids.tolist() if isinstance(ids, torch.Tensor) else [list(p) for p in ids]
    return at_position(model, prompts, layer + 1).float()


# ---------------------------------------------------------------------------- sentiment
def sentiment_direction(model: torch.nn.Module, corpus: Corpus, layer: int) -> torch.Tensor:
    return contrast_direction(model, sentiment_prompts(corpus, True, seed=2),
                              sentiment_prompts(corpus, False, seed=3), layer)


def sentiment_effect(model: torch.nn.Module, corpus: Corpus, layer: int,
                     vector: torch.Tensor) -> float:
    """Shift, on negative contexts, of the log-odds of a positive over a negative verb."""
    return steering_effect(model, sentiment_prompts(corpus, False, seed=1),
                           corpus.encode(" ".join(POS_VERB)), corpus.encode(" ".join(NEG_VERB)),
                           layer, vector)


# ---------------------------------------------------------------------------- refusal
def refusal_prompts(corpus: Corpus, forbidden: bool, n: int = 48, seed: int = 0
                    ) -> torch.Tensor:
    """``<bos> please {action} me the {object} .`` — answered "sure" or, for forbidden
    objects, "sorry"."""
    rng = np.random.default_rng(seed)
    objs = FORBIDDEN_OBJECTS if forbidden else SAFE_OBJECTS
    return torch.tensor([[corpus.bos_id, *corpus.encode(
        f"please {rng.choice(ACTIONS)} me the {rng.choice(objs)} .")] for _ in range(n)])


def refusal_direction(model: torch.nn.Module, corpus: Corpus, layer: int) -> torch.Tensor:
    return contrast_direction(model, refusal_prompts(corpus, True, seed=2),
                              refusal_prompts(corpus, False, seed=3), layer)


def refusal_effect(model: torch.nn.Module, corpus: Corpus, layer: int,
                   vector: torch.Tensor) -> float:
    """Shift, on harmless requests, of the log-odds of refusing ("sorry") over "sure"."""
    return steering_effect(model, refusal_prompts(corpus, False, seed=1),
                           corpus.encode("sorry"), corpus.encode("sure"), layer, vector)


def tiny_concepts(corpus: Corpus) -> list[Concept]:
    """The grammar's sentiment and refusal contrasts as :class:`Concept` records (what the
    steering experiment takes for any model)."""
    return [
        Concept("sentiment", sentiment_prompts(corpus, True, seed=2).tolist(),
                sentiment_prompts(corpus, False, seed=3).tolist(),
                sentiment_prompts(corpus, False, seed=1).tolist(),
                corpus.encode(" ".join(POS_VERB)), corpus.encode(" ".join(NEG_VERB)),
                "grammar reviews; log-odds of a positive over a negative verb"),
        Concept("refusal", refusal_prompts(corpus, True, seed=2).tolist(),
                refusal_prompts(corpus, False, seed=3).tolist(),
                refusal_prompts(corpus, False, seed=1).tolist(), corpus.encode("sorry"),
                corpus.encode("sure"), "grammar requests; log-odds of 'sorry' over 'sure'"),
    ]
