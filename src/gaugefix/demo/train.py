"""Training tiny language models on the generated corpus (CPU, seconds to minutes)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..group import SignedPerm
from ..tiny import build_tiny


def corpus_model(family: str, vocab_size: int, *, hidden_size: int = 64, layers: int = 2,
                 seed: int = 0) -> torch.nn.Module:
    """A tiny untrained model sized for the corpus (norm gains at their init values)."""
    kw: dict[str, object] = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                                 num_hidden_layers=layers)
    if family != "gpt2":
        kw["intermediate_size"] = 4 * hidden_size
    if family not in ("gpt2", "gpt_neox", "mamba"):
        kw["tie_word_embeddings"] = False
    return build_tiny(family, seed=seed, generic=False, **kw)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """Endless random windows of ``seq_len`` tokens from a token stream."""
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(tokens)
    high = len(tokens) - seq_len
    while True:
        starts = rng.integers(0, high, size=batch_size)
        yield torch.stack([data[s : s + seq_len] for s in starts])


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def train(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seq_len: int = 64,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
    warmup: int = 0,
    step_offset: int = 0,
) -> torch.optim.Optimizer:
    """Plain next-token training with AdamW; returns the optimizer (its state is reused).

    ``warmup``: linear learning-rate warm-up over that many steps, counted from
    ``step_offset`` (so training resumed in chunks warms up once)."""
    model.train()
    opt = optimizer or make_optimizer(model, lr)
    gen = batches(tokens, batch_size, seq_len, seed)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step_offset + step) / warmup) if warmup else lr
        ids = next(gen)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(loss))
    model.eval()
    return opt


@torch.no_grad()
def eval_loss(model: torch.nn.Module, tokens: np.ndarray, *, seq_len: int = 64,
              max_batches: int = 8, batch_size: int = 16) -> float:
    model.eval()
    n = min(max_batches * batch_size, (len(tokens) - 1) // seq_len)
    ids = torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len))
    losses = [float(model(chunk, labels=chunk).loss) for chunk in ids.split(batch_size)]
    return float(np.mean(losses))


def train_on_batches(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     batches: torch.Tensor) -> None:
    """One optimizer step per batch of token ids (identical steps for two charts)."""
    model.train()
    for ids in batches:
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def gauge_deviation(model_b: torch.nn.Module, model_a: torch.nn.Module,
                    gauge: SignedPerm) -> float:
    """‖W_B − Q·W_A‖ / ‖W_A‖ over all parameters together (0 when B is exactly A in chart B).

    A whole-model distance, not the worst single entry: Adam turns rounding-level gradient
    differences on parameters whose gradient is near zero into full ±lr steps, so the largest
    entry-wise deviation between two charts depends on the training run, while the relative
    distance of the whole model stays at rounding level for a correct transport."""
    from ..arch import detect_family

    fam = detect_family(model_a.config)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    num = sum(float((sd_b[k] - fam.op_for(k)(gauge, v)).double().pow(2).sum())
              for k, v in sd_a.items())
    den = sum(float(v.double().pow(2).sum()) for v in sd_a.values())
    return (num / den) ** 0.5
