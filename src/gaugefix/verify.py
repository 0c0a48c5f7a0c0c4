"""Function-equivalence check: does model B compute model A's function in chart B?

Both models run on the same probe tokens. The logits must agree, and every hidden
state of B must equal Q times A's (all of HF's ``hidden_states``, including the
last one taken after the final norm: a gain or LayerNorm bias in chart B is the
gauged one, so the normed state transforms by Q as well).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import GaugefixError
from .group import SignedPerm
from .model import Model, ModelLike, open_model, torch_dtype


@dataclass
class VerifyReport:
    n_tokens: int
    logits_rel_err: float
    hidden_rel_err: list[float] = field(default_factory=list)
    tol: float | None = None
    # quantised models (GGUF): each tensor's verdict (TensorMove.to_dict rows): "exact" (B's
    # values are A's moved, bit for bit), "requantised" (B is byte for byte the format's
    # reference quantiser on A's moved values: the function then differs by that, and the
    # forward errors above are reported, not held to ``tol``) or "differs"
    tensors: list[dict[str, Any]] | None = None
    # why the forward comparison did not run (a quantised format whose kernels' library is
    # not installed): the tensor verdicts above then decide ``passed`` alone
    forward: str | None = None
    # each output in which either model gave NaN or Inf (its error is then NaN, written as
    # null in JSON): "logits: 12 non-finite values in B"; any of them fails the check
    nonfinite: list[str] = field(default_factory=list)

    @property
    def max_rel_err(self) -> float:
        errors = [self.logits_rel_err, *self.hidden_rel_err]
        return math.nan if any(math.isnan(e) for e in errors) else max(errors)

    @property
    def requantised(self) -> int:
        return sum(t["how"] == "requantised" for t in self.tensors or ())

    @property
    def differs(self) -> list[str]:
        return [t["tensor"] for t in self.tensors or () if t["how"] == "differs"]

    @property
    def passed(self) -> bool:
        if self.differs or self.nonfinite:
            return False
        if self.forward is not None:  # no forward pass: the tensors decide
            return self.tensors is not None
        if self.requantised:  # not the same function by construction: the tensors decide
            return True
        return self.tol is None or self.max_rel_err <= self.tol

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "max_rel_err": self.max_rel_err, "passed": self.passed}
        if self.nonfinite:  # JSON has no NaN: null, and the reason beside it
            out["logits_rel_err"] = None if math.isnan(self.logits_rel_err) else \
                self.logits_rel_err
            out["hidden_rel_err"] = [None if math.isnan(e) else e for e in self.hidden_rel_err]
            out["max_rel_err"] = None
        else:
            out.pop("nonfinite")
        if self.forward is None:
            out.pop("forward")
        if self.tensors is None:
            out.pop("tensors")
        else:
            out["exact_tensors"] = sum(t["how"] == "exact" for t in self.tensors)
            out["requantised_tensors"] = self.requantised
        return out


def probe_tokens(vocab_size: int, n_tokens: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids, shape (batch, seq) with seq <= ``max_len``."""
    if n_tokens < 1:
        raise GaugefixError("need at least one probe token")
    seq = max(1, min(max_len, n_tokens))
    batch = max(1, -(-n_tokens // seq))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


# the default tolerance of each dtype: an exact gauge changes only the order of the sums
# inside the model, so the error is that dtype's rounding carried through the layers
DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1.5e-1}
MAX_PROBE_TOKENS = 1 << 20


COMPARE_ELEMENTS = 1 << 22  # float64 elements compared at a time
LOGITS_BYTES = 256 << 20  # float32 logits of one forward pass, per model (sets its batch)


class _MaxRel:
    """max|actual - expected| / max|expected| accumulated over batches; NaN once either side
    held a NaN or Inf (counted per side: a running max would drop a NaN silently)."""

    def __init__(self) -> None:
        self.diff = self.scale = 0.0
        self.bad = {"A": 0, "B": 0}  # non-finite values seen in each model's output

    def add(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        """In float64, a block of rows at a time: never a float64 copy of a whole batch of
        logits (a 262k-token vocabulary's are 1 GB in float32)."""
        a = actual.reshape(-1, actual.shape[-1])
        e = expected.reshape(-1, expected.shape[-1])
        step = max(1, COMPARE_ELEMENTS // max(1, a.shape[1]))
        for r0 in range(0, a.shape[0], step):
            xa, xe = a[r0:r0 + step].double(), e[r0:r0 + step].double()
            bad_b, bad_a = int((~torch.isfinite(xa)).sum()), int((~torch.isfinite(xe)).sum())
            if bad_a or bad_b:
                self.bad["A"] += bad_a
                self.bad["B"] += bad_b
                continue
            self.diff = max(self.diff, float((xa - xe).abs_().max()))
            self.scale = max(self.scale, float(xe.abs_().max()))

    @property
    def value(self) -> float:
        if self.bad["A"] or self.bad["B"]:
            return math.nan
        return self.diff / (self.scale if self.scale > 0 else 1.0)

    def why(self, name: str) -> str | None:
        """``name: N non-finite values in A, M in B`` (None when all were finite)."""
        said = [f"{n} in {side}" for side, n in self.bad.items() if n]
        return f"{name}: non-finite values (NaN or Inf) {', '.join(said)}" if said else None


@torch.no_grad()
def compare_models(model_a: torch.nn.Module, model_b: torch.nn.Module, gauge: SignedPerm,
                   input_ids: torch.Tensor, tol: float | None = None, *,
                   batch_size: int = 8) -> VerifyReport:
    """Logits and every hidden state of B against A's moved by ``gauge``, at most
    ``batch_size`` sequences per forward pass, fewer where their logits would exceed
    :data:`LOGITS_BYTES` (the errors are maxima over all of them)."""
    vocab = int(getattr(model_a.config, "vocab_size", 0) or 0)
    per_seq = 4 * input_ids.shape[1] * max(1, vocab)
    batch_size = max(1, min(batch_size, LOGITS_BYTES // per_seq))
    logits: _MaxRel = _MaxRel()
    hidden: list[_MaxRel] = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size]
        out_a = model_a(ids, output_hidden_states=True, use_cache=False)
        out_b = model_b(ids, output_hidden_states=True, use_cache=False)
        if not hidden:
            hidden = [_MaxRel() for _ in out_a.hidden_states]
        for acc, ha, hb in zip(hidden, out_a.hidden_states, out_b.hidden_states, strict=True):
            acc.add(hb, gauge.apply(ha, -1))
        logits.add(out_b.logits, out_a.logits)
        del out_a, out_b
    reasons = [logits.why("logits"), *(h.why(f"hidden_states[{i}]")
                                       for i, h in enumerate(hidden))]
    return VerifyReport(int(input_ids.numel()), logits.value, [h.value for h in hidden], tol,
                        nonfinite=[r for r in reasons if r is not None])


def verify_checkpoints(model_a: ModelLike, model_b: ModelLike, gauge: SignedPerm, *,
                       n_tokens: int = 256, tol: float | None = None, dtype: str = "float32",
                       seed: int = 0) -> VerifyReport:
    """Run both models on the same seeded probe tokens and compare (see the module
    docstring); ``n_tokens`` are run in windows of at most the model's positions (≤ 128),
    a few windows per forward pass. ``tol``: the largest relative error that passes
    (default: :data:`DEFAULT_TOL` of the dtype)."""
    if not 1 <= n_tokens <= MAX_PROBE_TOKENS:
        raise GaugefixError(f"{n_tokens} probe tokens: give 1 to {MAX_PROBE_TOKENS} (an exact "
                            "gauge shows on a few hundred)")
    ma, mb = open_model(model_a).check(), open_model(model_b).check()
    if ma.family.name != mb.family.name:
        raise GaugefixError(f"different families: {ma.family.name} vs {mb.family.name}")
    for m in (ma, mb):
        m.family.check_gauge(gauge, m.hidden_size)
    torch_dtype(dtype)  # refused before any model is loaded
    if ma.hf_quant is not None or mb.hf_quant is not None:
        return _verify_hf_quant(ma, mb, gauge, n_tokens=n_tokens, tol=tol, dtype=dtype,
                                seed=seed)
    a, b = ma.load(dtype), mb.load(dtype)
    vocab = min(ma.vocab_size, mb.vocab_size)
    ids = probe_tokens(vocab, n_tokens, min(128, ma.max_positions or 128), seed)
    report = compare_models(a, b, gauge, ids, DEFAULT_TOL[dtype] if tol is None else tol)
    if ma.gguf is not None and mb.gguf is not None:
        from .quant.gguf_file import check_moved

        report.tensors = [t.to_dict() for t in check_moved(ma.gguf, mb.gguf, ma.plan, gauge)]
    return report


def _verify_hf_quant(ma: Model, mb: Model, gauge: SignedPerm, *, n_tokens: int,
                     tol: float | None, dtype: str, seed: int) -> VerifyReport:
    """Checkpoints in a HF quantised format: each logical tensor's verdict
    (:func:`.quant.hf_checkpoint.check_moved`), and the forward comparison where
    transformers can run the format here (else ``forward`` says why not, in one line)."""
    from .quant.hf_checkpoint import QuantLibraryMissing, check_moved

    if ma.hf_quant is None or mb.hf_quant is None:
        raise GaugefixError(f"{(mb if ma.hf_quant is None else ma).name} is quantised and "
                            f"{(ma if ma.hf_quant is None else mb).name} is not: verify compares "
                            "a quantised checkpoint with its moved copy")
    tensors = [t.to_dict() for t in check_moved(ma, mb, gauge)]
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    try:
        a, b = ma.load(dtype), mb.load(dtype)
    except QuantLibraryMissing as exc:
        return VerifyReport(0, 0.0, [], tol, tensors=tensors, forward=str(exc))
    vocab = min(ma.vocab_size, mb.vocab_size)
    ids = probe_tokens(vocab, n_tokens, min(128, ma.max_positions or 128), seed)
    report = compare_models(a, b, gauge, ids, tol)
    report.tensors = tensors
    return report
