"""Gauge-group detection: family, norm kind, the gauge group, and gain genericity.

The gauge group among signed permutations is B_d for RMSNorm families and
S_d x {+-1} for LayerNorm ones — *if* the norm gains are generic. Coordinates
whose gains tie in every norm form a block on which any orthogonal map is also a
symmetry; at initialisation (all gains 1.0) that block is the whole stream and
the true gauge is continuous (O(d) for RMSNorm), so coordinate matching is
ill-posed. The fingerprint of coordinate i is the row of effective gains (and
LayerNorm biases) of every residual norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .arch import Family
from .model import ModelLike, open_model


@dataclass
class GaugeGroupReport:
    family: str
    model_type: str | None
    norm: str
    norm_description: str
    hidden_size: int
    gauge_group: str
    tied_embeddings: bool | None
    n_norm_vectors: int
    gains_all_one: bool
    tie_groups: list[list[int]] = field(default_factory=list)
    n_tied_coordinates: int = 0
    min_separation: float | None = None
    closest_pair: list[int] | None = None
    warnings: list[str] = field(default_factory=list)
    # a quantised model: tensors per quantised type (GGUF: Q4_1, Q4_K, ...)
    quantised: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gain_fingerprint(
    tensors: Mapping[str, torch.Tensor], family: Family
) -> tuple[np.ndarray, np.ndarray]:
    """d x k matrix of every residual norm gain (effective: 1+w for Gemma) and LN bias,
    and a length-k mask telling which columns are gains."""
    cols: list[np.ndarray] = []
    is_gain: list[bool] = []
    for key in sorted(tensors):
        op = family.op_for(key)
        if op.kind in ("G", "LB") and op.blocks == 1:
            offset = family.gain_offset if op.kind == "G" else 0.0
            cols.append(tensors[key].detach().double().cpu().numpy() + offset)
            is_gain.append(op.kind == "G")
    if not cols:
        return np.zeros((0, 0)), np.zeros(0, dtype=bool)
    return np.stack(cols, axis=1), np.array(is_gain)


def _min_separation(fp: np.ndarray, chunk: int = 1024) -> tuple[float, list[int]]:
    """Smallest max-abs distance between two coordinates' fingerprints."""
    x = torch.from_numpy(fp)
    best, pair = float("inf"), [0, 0]
    for start in range(0, x.shape[0], chunk):
        dist = torch.cdist(x[start : start + chunk], x, p=float("inf"))
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = float("inf")
        flat = int(torch.argmin(dist))
        val = float(dist.reshape(-1)[flat])
        if val < best:
            best, pair = val, [start + flat // x.shape[0], flat % x.shape[0]]
    return best, sorted(pair)


def diagnose(
    tensors: Mapping[str, torch.Tensor],
    family: Family,
    hidden_size: int,
    *,
    model_type: str | None = None,
    tied_embeddings: bool | None = None,
) -> GaugeGroupReport:
    fp, is_gain = gain_fingerprint(tensors, family)
    rep = GaugeGroupReport(
        family=family.name,
        model_type=model_type,
        norm=family.norm,
        norm_description=family.norm_description,
        hidden_size=hidden_size,
        gauge_group=family.gauge_group,
        tied_embeddings=tied_embeddings,
        n_norm_vectors=fp.shape[1] if fp.size else 0,
        gains_all_one=False,
    )
    if not family.norm_spec.gain:
        rep.warnings.append(
            "non-parametric LayerNorm: the function is invariant under the continuous group "
            "{Q ∈ O(d): Q·1 = ±1} ≅ O(d−1)×Z₂ and no parameter breaks it; only the training "
            "dynamics (elementwise Adam updates) single out the basis, so matched coordinates "
            "are meaningful between checkpoints of one training lineage only"
        )
        return rep
    rep.gains_all_one = bool(fp.size) and bool(np.all(fp[:, is_gain] == 1.0))
    _, inverse, counts = np.unique(fp, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    groups = [np.flatnonzero(inverse == g).tolist() for g in np.flatnonzero(counts > 1)]
    rep.tie_groups = sorted(groups, key=lambda g: (-len(g), g[0]))
    rep.n_tied_coordinates = int(sum(len(g) for g in groups))
    if fp.shape[0] > 1:
        rep.min_separation, rep.closest_pair = _min_separation(fp)

    continuous = (
        "the full orthogonal group O(d)"
        if family.allows_signs
        else "{Q ∈ O(d): Q·1 = ±1}"
    )
    if rep.n_tied_coordinates == hidden_size:
        if len(groups) == 1:
            rep.warnings.append(
                f"all {hidden_size} coordinates have identical norm parameters"
                f"{' (gains all 1.0, as at initialisation)' if rep.gains_all_one else ''}: "
                "the function-preserving gauge is "
                f"{continuous}, not {family.gauge_group}; coordinate matching is ill-posed"
            )
        else:
            rep.warnings.append(
                f"every coordinate ties with another in its norm parameters ({len(groups)} "
                "tie groups): each tied block of size k carries an O(k) gauge"
            )
    elif rep.n_tied_coordinates:
        rep.warnings.append(
            f"{rep.n_tied_coordinates} coordinates fall in {len(groups)} tie groups (largest "
            f"{len(rep.tie_groups[0])}): within each tied block of size k the gauge is O(k), "
            "so those coordinates are only determined up to rotation"
        )
    return rep


def inspect_checkpoint(model: ModelLike) -> GaugeGroupReport:
    """The gauge group of a checkpoint (or a model in memory), read from its norm tensors."""
    m = open_model(model).check()
    plan = m.plan
    norm_keys = [k for k, op in plan.items() if op.kind in ("G", "LB")]
    try:
        tensors = {k: m.tensor(k) for k in norm_keys}
    finally:
        m.close()
    rep = diagnose(
        tensors,
        m.family,
        m.hidden_size,
        model_type=m.config.get("model_type"),
        tied_embeddings=_tied(m.config),
    )
    rep.quantised = dict(m.quantised)
    return rep


def _tied(config: dict[str, Any]) -> bool | None:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(**config).tie_word_embeddings)
    except (ValueError, KeyError, TypeError, AttributeError):  # a config transformers rejects
        return None
