"""Function-equivalence check: does model B compute model A's function in chart B?

Both models run on the same probe tokens. The logits must agree, and every hidden
state of B must equal Q times A's (all of HF's ``hidden_states``, including the
last one taken after the final norm: a gain or LayerNorm bias in chart B is the
gauged one, so the normed state transforms by Q as well).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import GaugefixError
from .group import SignedPerm

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class VerifyReport:
    n_tokens: int
    logits_rel_err: float
    hidden_rel_err: list[float] = field(default_factory=list)
    tol: float | None = None

    @property
    def max_rel_err(self) -> float:
        return max([self.logits_rel_err, *self.hidden_rel_err])

    @property
    def passed(self) -> bool:
        return self.tol is None or self.max_rel_err <= self.tol

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_rel_err": self.max_rel_err, "passed": self.passed}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (in float64)."""
    a, e = actual.double(), expected.double()
    scale = float(e.abs().max())
    return float((a - e).abs().max()) / (scale if scale > 0 else 1.0)


def probe_tokens(vocab_size: int, n_tokens: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids, shape (batch, seq) with seq <= ``max_len``."""
    if n_tokens < 1:
        raise GaugefixError("need at least one probe token")
    seq = max(1, min(max_len, n_tokens))
    batch = max(1, -(-n_tokens // seq))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


@torch.no_grad()
def compare_models(model_a: torch.nn.Module, model_b: torch.nn.Module, gauge: SignedPerm,
                   input_ids: torch.Tensor, tol: float | None = None) -> VerifyReport:
    out_a = model_a(input_ids, output_hidden_states=True, use_cache=False)
    out_b = model_b(input_ids, output_hidden_states=True, use_cache=False)
    hidden = [
        rel_err(hb, gauge.apply(ha, -1))
        for ha, hb in zip(out_a.hidden_states, out_b.hidden_states, strict=True)
    ]
    return VerifyReport(int(input_ids.numel()), rel_err(out_b.logits, out_a.logits), hidden, tol)


def load_causal_lm(path: Path, dtype: torch.dtype, **options: Any) -> torch.nn.Module:
    """A checkpoint through transformers' own loading (``options`` go to from_pretrained,
    e.g. a device map), with every way it can refuse a bad checkpoint in one line."""
    from transformers import AutoModelForCausalLM

    # transformers' fused-expert kernel (grouped_mm) has no float64; the eager loop does
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    extra.update(options)
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).eval()
    except pickle.UnpicklingError:
        raise GaugefixError(f"{path}: refused: its weights need code to unpickle, and gaugefix "
                            "only reads torch files with weights_only=True") from None
    except SafetensorError as exc:
        raise GaugefixError(f"{path}: not a valid weight shard ({exc})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # config or files unusable
        first = str(exc).strip().split("\n", 1)[0]
        raise GaugefixError(f"{path}: transformers could not load the model ({first})") from None
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise  # a bug or out of memory, not a bad checkpoint: let it show
        raise GaugefixError(f"{path}: tensor shapes do not fit its config.json") from None


def verify_checkpoints(model_a: str | Path, model_b: str | Path, gauge: SignedPerm, *,
                       n_tokens: int = 256, tol: float = 1e-4, dtype: str = "float32",
                       seed: int = 0) -> VerifyReport:
    ca, cb = Checkpoint.open(model_a), Checkpoint.open(model_b)
    if ca.family.name != cb.family.name:
        raise GaugefixError(f"different families: {ca.family.name} vs {cb.family.name}")
    for c in (ca, cb):
        c.family.check_gauge(gauge, c.hidden_size)
    if dtype not in DTYPES:
        raise GaugefixError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    a = load_causal_lm(ca.path, DTYPES[dtype])
    b = load_causal_lm(cb.path, DTYPES[dtype])
    vocab = min(a.config.get_text_config().vocab_size, b.config.get_text_config().vocab_size)
    max_len = getattr(a.config, "max_position_embeddings", None) or getattr(
        a.config, "n_positions", None) or 128
    ids = probe_tokens(vocab, n_tokens, min(128, max_len), seed)
    return compare_models(a, b, gauge, ids, tol)
