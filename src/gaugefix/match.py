"""Gauge estimation: assignment on a cross-correlation between two charts.

``C[j, i]`` correlates A's coordinate j with B's coordinate i. For a true gauge
``x_B[i] = s_i x_A[perm[i]]``, ``C[perm[i], i] = s_i`` (up to noise). Methods:

* ``signmarg`` — sign-marginalised Hungarian matching: the assignment maximising
  ``sum_i |C[perm[i], i]|``, each sign read off ``C`` at the matched entry. For
  LayerNorm families one global sign, chosen from the matched correlations.
* ``signed`` — the raw baseline maximising ``sum_i C[perm[i], i]`` with all signs
  +1: it can only find coordinates whose true sign is +1, so its permutation
  accuracy is capped by the positive-sign fraction of the true gauge.
* ``perm`` — permutation-only alignment (the S_d answer): the permutation of
  ``signmarg`` with every sign forced to +1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .errors import GaugefixError
from .group import SignedPerm

Method = Literal["signmarg", "signed", "perm"]
METHODS: tuple[str, ...] = ("signmarg", "signed", "perm")
SOLVERS: tuple[str, ...] = ("lapjvs", "scipy")
LOW_CONFIDENCE = 0.05  # correlation margin, for one matrix as it is (match_correlation)
# Combined evidence (match_evidence): a margin in standard deviations of the score. Calibrated
# on benchmarks/bench_lineages.py (54 lineages, 117,504 matched coordinates): below 1.5 flags
# every wrong coordinate (recall 1.000) and 3.9% of right ones; below 1.0, recall 0.997, 2.8%.
LOW_MARGIN_SD = 1.5


def solve_assignment(score: np.ndarray, solver: str = "lapjvs") -> np.ndarray:
    """The exact maximum-weight perfect matching: ``perm[i]`` = row assigned to column i."""
    score = np.ascontiguousarray(score, dtype=np.float64)
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise GaugefixError(f"assignment needs a square score matrix, got {score.shape}")
    if not np.isfinite(score).all():
        raise GaugefixError("assignment score contains NaN/Inf")
    if solver == "lapjvs":
        import lap

        rows, cols = lap.lapjvs(-score, return_cost=False, jvx_like=True, prefer_float32=False)
    elif solver == "scipy":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(score, maximize=True)
    else:
        raise GaugefixError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    perm = np.empty(score.shape[1], dtype=np.int64)
    perm[np.asarray(cols)] = np.asarray(rows)
    return perm


def match_margin(score: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Per-coordinate confidence: matched score minus the best alternative in its row
    (A's coordinate paired elsewhere) or column (B's coordinate paired elsewhere)."""
    d = score.shape[0]
    cols = np.arange(d)
    matched = score[perm, cols]
    col_masked = score.copy()
    col_masked[perm, cols] = -np.inf
    best_in_col = col_masked.max(axis=0)  # other A coordinates for B's i
    best_in_row = col_masked.max(axis=1)[perm]  # other B coordinates for A's perm[i]
    return matched - np.maximum(best_in_col, best_in_row)


@dataclass
class MatchResult:
    gauge: SignedPerm
    confidence: np.ndarray
    matched_corr: np.ndarray  # signed C at the matched entries
    method: str
    # below this a coordinate is flagged: the confidence's own unit (a correlation margin for
    # one matrix as it is, standard deviations of the score for combined evidence)
    threshold: float = LOW_CONFIDENCE
    weights: dict[str, float] = field(default_factory=dict)  # each block of evidence's weight

    @property
    def mean_abs_corr(self) -> float:
        return float(np.mean(np.abs(self.matched_corr)))

    def summary(self, threshold: float | None = None) -> dict[str, float]:
        c = self.confidence
        t = self.threshold if threshold is None else threshold
        return {
            "mean_abs_corr": self.mean_abs_corr,
            "min_confidence": float(c.min()),
            "median_confidence": float(np.median(c)),
            "n_low_confidence": int((c < t).sum()),
            "low_confidence_threshold": t,
        }

    def low_confidence(self, threshold: float | None = None) -> list[int]:
        t = self.threshold if threshold is None else threshold
        return np.flatnonzero(self.confidence < t).tolist()


def match_correlation(corr: np.ndarray | torch.Tensor, method: str = "signmarg", *,
                      global_sign_only: bool = False, solver: str = "lapjvs",
                      magnitude: np.ndarray | None = None) -> MatchResult:
    """Estimate the gauge A -> B from ``corr[j, i] = corr(x_A[j], x_B[i])``.

    ``magnitude`` optionally replaces ``|corr|`` as the sign-blind score (the
    weight-based estimate blends in unsigned evidence there).
    """
    c = corr.detach().cpu().numpy() if isinstance(corr, torch.Tensor) else np.asarray(corr)
    c = c.astype(np.float64)
    if method not in METHODS:
        raise GaugefixError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not np.isfinite(c).all():
        raise GaugefixError("correlation matrix contains NaN/Inf")
    gauge, conf = _assign(np.abs(c) if magnitude is None else magnitude, c, c, method,
                          global_sign_only, solver)
    return MatchResult(gauge, conf, c[gauge.perm, np.arange(c.shape[1])], method)


def _assign(blind: np.ndarray, signed: np.ndarray, signed_margin: np.ndarray, method: str,
            global_sign_only: bool, solver: str) -> tuple[SignedPerm, np.ndarray]:
    """One method's assignment and per-coordinate confidence. ``signed``: the assignment on
    the signed score, every sign +1 (margin read off ``signed_margin``); otherwise on the
    sign-blind score, each sign read off the signed one at the matched entry (one global sign
    for LayerNorm families, none for ``perm``)."""
    d = blind.shape[1]
    if method == "signed":
        perm = solve_assignment(signed, solver)
        return SignedPerm(perm, np.ones(d, dtype=np.int64)), match_margin(signed_margin, perm)
    perm = solve_assignment(blind, solver)
    matched = signed[perm, np.arange(d)]
    if method == "perm":
        sign = np.ones(d, dtype=np.int64)
    elif global_sign_only:
        sign = np.full(d, 1 if matched.sum() >= 0 else -1, dtype=np.int64)
    else:
        sign = np.where(matched >= 0, 1, -1).astype(np.int64)
    return SignedPerm(perm, sign), match_margin(blind, perm)


# ---------------------------------------------------------------------------- evidence
def standardized(score: np.ndarray) -> np.ndarray:
    """How far each entry stands above the other candidates of its row and of its column, in
    their standard deviations (the smaller of the two): a pair is only as good as its standing
    against both coordinates' alternatives."""
    r = (score - score.mean(1, keepdims=True)) / (score.std(1, keepdims=True) + 1e-12)
    c = (score - score.mean(0, keepdims=True)) / (score.std(0, keepdims=True) + 1e-12)
    return np.minimum(r, c)


def fisher_z(corr: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(corr, -0.999, 0.999))


def block_weight(std_score: np.ndarray) -> float:
    """How much one block of evidence can be trusted: the median, over A's coordinates, of the
    gap between its best and second-best candidate (in standard deviations). Noise has a small
    gap; a block that singles out partners has a large one."""
    if std_score.shape[1] < 2:
        return 1.0
    top = np.partition(std_score, -2, axis=1)[:, -2:]
    return max(0.0, float(np.median(top[:, 1] - top[:, 0])))


@dataclass
class Evidence:
    """Similarity matrices between A's and B's coordinates (``[j, i]``: A's j, B's i), each
    correlation-like in [-1, 1]: residual positions' activation correlations and weight
    signatures. Named, for reports."""

    blocks: list[np.ndarray]
    names: list[str]

    def combined(self) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """(sign-blind score, signed score, each block's weight). Each block enters as its
        Fisher-z, standardised against its rows' and columns' other candidates, weighted by
        :func:`block_weight`; the scores are weighted means, so the sign-blind one is in
        standard deviations whatever the number of blocks."""
        zs = [fisher_z(np.asarray(b, dtype=np.float64)) for b in self.blocks]
        stds = [standardized(np.abs(z)) for z in zs]
        weights = [block_weight(s) for s in stds]
        total = sum(weights)
        if total <= 0:  # no block singles anything out: every block counts the same
            weights, total = [1.0] * len(zs), float(len(zs))
        score = sum(w * s for w, s in zip(weights, stds, strict=True)) / total
        signed = sum(w * z for w, z in zip(weights, zs, strict=True)) / total
        return score, signed, weights


def match_evidence(evidence: Evidence, method: str = "signmarg", *,
                   global_sign_only: bool = False, solver: str = "lapjvs") -> MatchResult:
    """The gauge A -> B from several blocks of evidence weighed by their reliability
    (:meth:`Evidence.combined`). ``confidence``: each coordinate's margin over its best
    alternative in the combined score, in standard deviations (flag below
    :data:`LOW_MARGIN_SD`); ``matched_corr``: the weighted mean Fisher-z, back as a
    correlation."""
    if method not in METHODS:
        raise GaugefixError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not evidence.blocks:
        raise GaugefixError("no evidence to match on")
    for name, b in zip(evidence.names, evidence.blocks, strict=True):
        if not np.isfinite(b).all():
            raise GaugefixError(f"evidence {name} contains NaN/Inf")
    score, signed, weights = evidence.combined()
    margin = standardized(signed) if method == "signed" else score
    gauge, conf = _assign(score, signed, margin, method, global_sign_only, solver)
    return MatchResult(gauge, conf, np.tanh(signed[gauge.perm, np.arange(signed.shape[1])]),
                       method, LOW_MARGIN_SD, {n: round(float(w), 4) for n, w in
                                               zip(evidence.names, weights, strict=True)})
