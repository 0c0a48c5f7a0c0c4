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

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import GaugefixError
from .group import SignedPerm

Method = Literal["signmarg", "signed", "perm"]
METHODS: tuple[str, ...] = ("signmarg", "signed", "perm")
SOLVERS: tuple[str, ...] = ("lapjvs", "scipy")
LOW_CONFIDENCE = 0.05


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

    @property
    def mean_abs_corr(self) -> float:
        return float(np.mean(np.abs(self.matched_corr)))

    def summary(self, threshold: float = LOW_CONFIDENCE) -> dict[str, float]:
        c = self.confidence
        return {
            "mean_abs_corr": self.mean_abs_corr,
            "min_confidence": float(c.min()),
            "median_confidence": float(np.median(c)),
            "n_low_confidence": int((c < threshold).sum()),
            "low_confidence_threshold": threshold,
        }

    def low_confidence(self, threshold: float = LOW_CONFIDENCE) -> list[int]:
        return np.flatnonzero(self.confidence < threshold).tolist()


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
    d = c.shape[1]
    cols = np.arange(d)
    if method == "signed":
        perm = solve_assignment(c, solver)
        sign = np.ones(d, dtype=np.int64)
        conf = match_margin(c, perm)
    else:
        score = np.abs(c) if magnitude is None else magnitude
        perm = solve_assignment(score, solver)
        conf = match_margin(score, perm)
        matched = c[perm, cols]
        if method == "perm":
            sign = np.ones(d, dtype=np.int64)
        elif global_sign_only:
            sign = np.full(d, 1 if matched.sum() >= 0 else -1, dtype=np.int64)
        else:
            sign = np.where(matched >= 0, 1, -1).astype(np.int64)
    return MatchResult(SignedPerm(perm, sign), conf, c[perm, cols], method)
