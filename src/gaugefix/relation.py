"""Whether B derives from A: a held-out alignment test with a known false-positive rate.

The tensors with one residual axis are split in two folds (layers by parity; the others
alternate). Each fold's gauge is matched on that fold alone (data-free, as
:func:`gaugefix.estimate.match_weights` does) and tested on the *other* fold, so the test
tensors played no part in choosing it. The statistic is the sum over test tensors of
cos(B_t, g(A_t)): the cosine of the whole tensor, which no scale of either model moves.

Its null is built from the checkpoints themselves: the same sum when the gauge carries no
information, i.e. a uniformly random element of the family's group (independently for each
fold). Per tensor, with ``N[i, j] = <B_i, A_j> / (‖A‖‖B‖)`` (B's coordinate i, A's j) summed
over a fold's test tensors, the statistic is ``S = Σ_i s_i N[i, π(i)]``, and over random
(π, s):

* B_d families (independent signs): mean 0, variance ``‖N‖²_F / d``; and, whatever π, a sum
  of d independent symmetric terms, so Hoeffding's bound ``P(S ≥ t) ≤ exp(−t² / 2V)`` with
  ``V = Σ_i max_j N[i, j]²`` holds exactly: that bound is the p-value (conservative);
* S_d×{±1} families (one global sign σ): ``S = σ(T − E T)`` with ``T = Σ_i N[i, π(i)]``, mean 0
  and Hoeffding's combinatorial variance ``Σ (N − row − col + mean)² / (d − 1)``; the p-value
  is the normal tail (a combinatorial central limit, not a bound).

The two folds' statistics add (independent random elements: variances and bounds add), as do
tensor groups' (one name pattern across layers), so a group's p-value and the combined one are
the same test on fewer or more tensors: no independence between groups is assumed. Under
"unrelated" (B drawn independently of A, by a recipe that treats residual coordinates alike —
a random initialisation and any training from it), a gauge fitted on one fold is, for the
other fold, no better than a random group element: so the false-positive rate is at most
``alpha`` (B_d) or ``alpha`` up to the normal approximation (S_d×{±1}).

Every product is taken in row blocks (float32, accumulated in float64): no float64 copy of a
whole tensor is made, whatever the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .arch import LAYER_INDEX, Op
from .group import SignedPerm
from .match import Evidence, MatchResult, match_evidence
from .model import Model

# the default significance level: at most one unrelated pair in a million called derived
DEFAULT_ALPHA = 1e-6
BLOCK_BYTES = 32 << 20  # float32 bytes of one row block of one side


def residual_rows(t: torch.Tensor, axis: int, d: int) -> torch.Tensor:
    """``t`` as [n, d], its residual axis last (a view for 2-D tensors)."""
    return torch.movedim(t, axis, -1).reshape(-1, d)


def _steps(n: int, d: int) -> range:
    return range(0, n, max(1, BLOCK_BYTES // (4 * max(1, d))))


@dataclass
class Gram:
    """One tensor's cross products: ``cross[i, j] = <B_i, A_j>`` over its non-residual entries,
    the two tensors' norms and each coordinate's squared norm."""

    cross: np.ndarray
    norm_a: float
    norm_b: float
    sq_a: np.ndarray
    sq_b: np.ndarray


def cross_gram(ta: torch.Tensor, tb: torch.Tensor, axis: int, d: int) -> Gram:
    ra, rb = residual_rows(ta, axis, d), residual_rows(tb, axis, d)
    cross = torch.zeros(d, d, dtype=torch.float64)
    sq_a = torch.zeros(d, dtype=torch.float64)
    sq_b = torch.zeros(d, dtype=torch.float64)
    step = _steps(ra.shape[0], d).step
    for r0 in range(0, ra.shape[0], step):
        xa = ra[r0:r0 + step].float()
        xb = rb[r0:r0 + step].float()
        cross += (xb.T @ xa).double()
        sq_a += (xa * xa).sum(0).double()
        sq_b += (xb * xb).sum(0).double()
    return Gram(cross.numpy(), float(sq_a.sum().sqrt()), float(sq_b.sum().sqrt()),
                sq_a.numpy(), sq_b.numpy())


def relative_distance(op: Op, ta: torch.Tensor, tb: torch.Tensor, gauge: SignedPerm,
                      d: int) -> float:
    """‖B − g(A)‖ / max(‖A‖, ‖B‖), accumulated over row blocks in float64."""
    if op.one_stream:
        ra = residual_rows(ta, op.residual_axis, d)
        rb = residual_rows(tb, op.residual_axis, d)
        perm = torch.from_numpy(np.array(gauge.perm, dtype=np.int64))
        sign = torch.from_numpy(np.array(gauge.sign if op.signed else np.ones(d), dtype=np.float64))
    else:  # a residual map, several streams or untouched: small, moved whole
        ra = op(gauge, ta).reshape(-1, 1)
        rb = tb.reshape(-1, 1)
        perm, sign = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64)
    diff = na = nb = 0.0
    step = _steps(ra.shape[0], ra.shape[1]).step
    for r0 in range(0, ra.shape[0], step):
        xa = ra[r0:r0 + step][:, perm].double() * sign
        xb = rb[r0:r0 + step].double()
        diff += float(((xb - xa) ** 2).sum())
        na += float((xa * xa).sum())
        nb += float((xb * xb).sum())
    scale = math.sqrt(max(na, nb))
    return math.sqrt(diff) / scale if scale > 0 else 0.0


def moved_rows(op: Op, t: torch.Tensor, gauge: SignedPerm, d: int) -> Iterator[np.ndarray]:
    """g(t) as float64 blocks of rows of its view [-1, last axis] (in order): a 2-D tensor is
    moved a block at a time, never whole; others (small: norms, residual maps) at once."""
    perm = np.array(gauge.perm, dtype=np.int64)
    sign = np.array(gauge.sign if op.signed else np.ones(d), dtype=np.float64)
    if t.dim() == 2 and op.one_stream:
        axis = op.residual_axis % 2
        step = _steps(t.shape[0], t.shape[1]).step
        if axis == 1:
            for r0 in range(0, t.shape[0], step):
                yield t[r0:r0 + step].double().numpy()[:, perm] * sign
        else:
            for r0 in range(0, d, step):
                rows = torch.from_numpy(perm[r0:r0 + step])
                yield t[rows].double().numpy() * sign[r0:r0 + step, None]
        return
    moved = op(gauge, t)
    flat = moved.reshape(-1, moved.shape[-1] if moved.dim() else 1)
    step = _steps(flat.shape[0], flat.shape[1]).step
    for r0 in range(0, flat.shape[0], step):
        yield flat[r0:r0 + step].double().numpy()


def folds(keys: list[str]) -> dict[str, int]:
    """Each tensor's fold: its layer's parity; tensors outside layers alternate. When that
    leaves a fold empty (one layer), every tensor alternates."""
    out, loose = {}, 0
    for key in sorted(keys):
        m = LAYER_INDEX.search(key)
        if m is not None:
            out[key] = int(m.group()) % 2
        else:
            out[key], loose = loose % 2, loose + 1
    if len(set(out.values())) < 2:
        out = {k: i % 2 for i, k in enumerate(sorted(keys))}
    return out


def group_name(key: str) -> str:
    return LAYER_INDEX.sub("*", key)


@dataclass
class NullSum:
    """A fold's (or group's) statistic under a gauge, and its null's variance and bound."""

    stat: float = 0.0
    var: float = 0.0
    bound: float = 0.0  # Hoeffding's proxy (B_d)
    tensors: int = 0
    cosine: float = 0.0  # the sum of the test tensors' cosines (the uncentred statistic)

    def add(self, other: NullSum) -> None:
        self.stat += other.stat
        self.var += other.var
        self.bound += other.bound
        self.tensors += other.tensors
        self.cosine += other.cosine


def null_sum(n: np.ndarray, gauge: SignedPerm, signed: bool, tensors: int) -> NullSum:
    d = n.shape[0]
    matched = n[np.arange(d), gauge.perm]
    if signed:
        stat = float((gauge.sign * matched).sum())
        var = float((n * n).sum()) / d
        bound = float((n * n).max(1).sum())
        cosine = stat
    else:
        centred = n - n.mean(1, keepdims=True) - n.mean(0, keepdims=True) + n.mean()
        stat = float(gauge.sign[0]) * float(matched.sum() - n.sum() / d)
        var = float((centred * centred).sum()) / max(1, d - 1)
        bound = 0.0
        cosine = float(gauge.sign[0]) * float(matched.sum())
    return NullSum(stat, var, bound, tensors, cosine)


def log10_p(null: NullSum, signed: bool) -> tuple[float, float]:
    """(log10 p, z): Hoeffding's bound (B_d) or the normal tail (S_d×{±1}); one-sided."""
    z = null.stat / math.sqrt(null.var) if null.var > 0 else 0.0
    if null.var <= 0:
        return 0.0, z
    if signed:
        if null.stat <= 0:
            return 0.0, z
        return min(0.0, -null.stat ** 2 / (2 * null.bound) / math.log(10)), z
    tail = 0.5 * math.erfc(z / math.sqrt(2))
    if tail > 0:
        return math.log10(tail), z
    # beyond float range: the normal tail's asymptote
    return (-z * z / 2 - math.log(z * math.sqrt(2 * math.pi))) / math.log(10), z


def agreement_log10_p(k: int, d: int, signed: bool) -> float:
    """log10 P(K ≥ k) for K ~ Binomial(d, q): how many coordinates two gauges with no common
    coordinate correspondence map alike by chance (partner and sign: q = 1/2d for B_d; the
    partner under one global sign: q = 1/d). Measured on independently trained pairs
    (``benchmarks/bench_identify.py --independent``) the two folds' gauges agree on 0 or 1
    coordinate; on every coordinate for fine-tunes up to lr 1e-2, and on 9–13 of 64 for the
    demo lineages' lr 6e-2 fine-tunes that the cosine statistic misses: an effect size that
    convergent learning did not inflate there (it adds a shared, diffuse structure to the
    cosine statistic, not a correspondence). Reported beside the verdict; not yet part of it."""
    from scipy.stats import binom

    if k <= 0:
        return 0.0
    return float(binom.logsf(k - 1, d, 1 / (2 * d) if signed else 1 / d)) / math.log(10)


@dataclass
class Relation:
    """The held-out test: ``p_value`` (combined), per tensor group, and the gauge matched on
    every tensor (the witness)."""

    match: MatchResult
    p_value: float
    log10_p_value: float
    z: float
    mean_cosine: float  # the test tensors' mean cos(B_t, g(A_t)), each under the other fold's g
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: int = 0
    fold_agreement: int = 0  # how many coordinates the two folds' gauges map alike
    fold_agreement_log10_p: float = 0.0  # its tail under gauges with no common correspondence

    @property
    def fold_gauges_agree(self) -> float:
        """The share of coordinates the two folds' gauges map alike."""
        return self.fold_agreement / self.match.gauge.d

    def evidence(self, alpha: float) -> dict[str, Any]:
        return {"p_value": self.p_value, "log10_p_value": round(self.log10_p_value, 3),
                "alpha": alpha, "z": round(self.z, 3),
                "held_out_mean_cosine": round(self.mean_cosine, 6),
                "tensors_tested": self.tensors,
                "fold_gauges_agree": round(self.fold_gauges_agree, 6),
                "fold_agreement_coordinates": self.fold_agreement,
                "fold_agreement_log10_p": round(self.fold_agreement_log10_p, 3),
                "groups": self.groups}


def _matcher(grams: dict[str, Gram], d: int, signed: bool) -> MatchResult:
    """The data-free match (as :func:`gaugefix.estimate.weight_evidence` with every entry of
    every tensor, each tensor weighing the same)."""
    dot = np.zeros((d, d))
    na, nb = np.zeros(d), np.zeros(d)
    for g in grams.values():
        w = d / (g.norm_a * g.norm_b)
        dot += w * g.cross
        na += w * g.sq_a
        nb += w * g.sq_b
    denom = np.outer(np.sqrt(nb), np.sqrt(na))
    c = np.where(denom > 0, dot / np.maximum(denom, 1e-300), 0.0)
    return match_evidence(Evidence([c.T.copy()], ["weights"]), "signmarg",
                          global_sign_only=not signed)


def relate(a: Model, b: Model) -> Relation | None:
    """The held-out test of A against B (same family, width and tensor shapes); None when
    fewer than two tensors with one residual axis are nonzero on both sides."""
    d = a.hidden_size
    signed = a.family.allows_signs
    grams: dict[str, Gram] = {}
    for key, op in sorted(a.plan.items()):
        if not op.one_stream or not op.signed:
            continue
        g = cross_gram(a.tensor(key), b.tensor(key), op.residual_axis, d)
        if g.norm_a > 0 and g.norm_b > 0 and math.isfinite(g.norm_a * g.norm_b):
            grams[key] = g
    if len(grams) < 2:
        return None
    fold = folds(list(grams))
    gauges = [_matcher({k: g for k, g in grams.items() if fold[k] == f}, d, signed).gauge
              for f in (0, 1)]
    # a fold's tensors share its gauge: their matrices add before the null is taken; the
    # two folds' gauges are independent under the null, so their nulls add after
    parts: dict[tuple[str, int], np.ndarray] = {}
    sizes: dict[tuple[str, int], int] = {}
    for key, g in grams.items():
        at = (group_name(key), fold[key])
        parts[at] = parts.get(at, 0.0) + g.cross / (g.norm_a * g.norm_b)
        sizes[at] = sizes.get(at, 0) + 1
    groups: dict[str, NullSum] = {}
    for (name, f), n in parts.items():
        groups.setdefault(name, NullSum()).add(null_sum(n, gauges[1 - f], signed, sizes[name, f]))
    total = NullSum()
    for f in (0, 1):
        n = sum((m for (_, ff), m in parts.items() if ff == f), np.zeros((d, d)))
        total.add(null_sum(n, gauges[1 - f], signed, sum(k for (_, ff), k in sizes.items()
                                                       if ff == f)))
    log_p, z = log10_p(total, signed)
    out = Relation(_matcher(grams, d, signed), 10 ** log_p, log_p, z,
                   total.cosine / total.tensors, tensors=total.tensors)
    alike = (gauges[0].perm == gauges[1].perm) & (gauges[0].sign == gauges[1].sign)
    out.fold_agreement = int(alike.sum())
    out.fold_agreement_log10_p = agreement_log10_p(out.fold_agreement, d, signed)
    for name, null in sorted(groups.items()):
        lp, gz = log10_p(null, signed)
        out.groups[name] = {"tensors": null.tensors, "mean_cosine": round(null.cosine /
                            null.tensors, 6), "z": round(gz, 3), "p_value": 10 ** lp,
                            "log10_p_value": round(lp, 3)}
    return out
