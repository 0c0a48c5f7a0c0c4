"""Gauge-sweep audits of index-level interpretability claims.

A claim says: at residual position ``layer``, the concept (contrast prompts, or a
direction) is carried by these coordinates, with these signs (top-k). Written in
the chart of its source checkpoint, it is only meaningful relative to that chart.
The audit re-derives the claim on each audited checkpoint, under a sweep of
gauges (random B_d, random S_d×{±1}, and the estimated gauge), and reports

* **raw**: the fraction of claimed (index, sign) pairs found, by raw index, among
  the top-k re-derived on the audited model;
* **transported**: the same after carrying the claim through the explicit gauge
  from the source chart to the audited one (index map and signs).

Claim file (JSON)::

    {"format": "gaugefix.claim/1", "layer": 1,
     "concept": {"positive": ["the soup was lovely and i", ...],
                 "negative": ["the soup was awful and i", ...]},
     "coordinates": [{"index": 12, "sign": 1}, {"index": 40, "sign": -1}],
     "source": "path/to/source-checkpoint"}

Prompts are text (tokenised with the audited model's tokenizer) or lists of token
ids; ``concept`` may instead be ``{"direction": [d floats]}`` in the source chart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import detect_family, hidden_size_of
from .errors import GaugefixError
from .group import SignedPerm
from .io import MiB, json_type, read_json

CLAIM_FORMAT = "gaugefix.claim/1"


@dataclass
class Claim:
    layer: int
    coordinates: list[tuple[int, int]]
    positive: list[Any] | None = None
    negative: list[Any] | None = None
    direction: np.ndarray | None = None
    source: str | None = None

    @property
    def k(self) -> int:
        return len(self.coordinates)

    def to_json(self) -> dict[str, Any]:
        concept: dict[str, Any] = (
            {"direction": self.direction.tolist()} if self.direction is not None
            else {"positive": self.positive, "negative": self.negative})
        doc = {"format": CLAIM_FORMAT, "layer": self.layer, "concept": concept,
               "coordinates": [{"index": i, "sign": s} for i, s in self.coordinates]}
        if self.source is not None:
            doc["source"] = self.source
        return doc


def _int(value: Any, what: str) -> int:
    """A JSON integer (not a bool, not 3.7, not "3")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GaugefixError(f"{what} must be an integer, got {value!r}")
    return value


def _prompts(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise GaugefixError(f"{what} must be a non-empty list of prompts (text or token-id "
                            f"lists), got {json_type(value)}")
    for n, p in enumerate(value):
        if isinstance(p, str):
            if not p.strip():
                raise GaugefixError(f"{what}[{n}] is an empty prompt")
        elif isinstance(p, list):
            if not p:
                raise GaugefixError(f"{what}[{n}] is an empty prompt")
            for t in p:
                if _int(t, f"{what}[{n}] token id") < 0:
                    raise GaugefixError(f"{what}[{n}] has a negative token id {t}")
        else:
            raise GaugefixError(f"{what}[{n}] must be text or a list of token ids, got "
                                f"{json_type(p)}")
    return value


# a claim names a few coordinates and prompts, or one direction of d numbers (about 1.5 MB
# of JSON at d = 65536): far above that, the file is something else
CLAIM_LIMIT = 64 * MiB


def load_claim(path: str | Path) -> Claim:
    p = Path(path)
    doc = read_json(p, "claim file", limit=CLAIM_LIMIT)
    if doc.get("format") != CLAIM_FORMAT:
        raise GaugefixError(f"{p}: not a claim file (format must be {CLAIM_FORMAT!r})")
    missing = [k for k in ("layer", "concept", "coordinates") if k not in doc]
    if missing:
        raise GaugefixError(f"{p}: the claim lacks {', '.join(map(repr, missing))}; see the "
                            "README for the format")
    where = str(p)
    layer = _int(doc["layer"], f"{where}: layer")
    if layer < 0:
        raise GaugefixError(f"{where}: layer must be a residual position ≥ 0, got {layer}")
    coords_doc = doc["coordinates"]
    if not isinstance(coords_doc, list) or not coords_doc:
        raise GaugefixError(f"{where}: coordinates must be a non-empty list")
    coords = []
    for n, c in enumerate(coords_doc):
        if not isinstance(c, dict) or "index" not in c:
            raise GaugefixError(f"{where}: coordinates[{n}] must be an object with an 'index'")
        index = _int(c["index"], f"{where}: coordinates[{n}].index")
        sign = _int(c.get("sign", 1), f"{where}: coordinates[{n}].sign")
        if index < 0 or sign not in (1, -1):
            raise GaugefixError(f"{where}: coordinates[{n}] needs an index ≥ 0 and a sign ±1, "
                                f"got index {index}, sign {sign}")
        coords.append((index, sign))
    if len(set(i for i, _ in coords)) != len(coords):
        raise GaugefixError(f"{where}: coordinates name an index twice")
    concept = doc["concept"]
    if not isinstance(concept, dict):
        raise GaugefixError(f"{where}: concept must be an object with 'positive' and "
                            f"'negative' prompts or a 'direction', got {json_type(concept)}")
    source = doc.get("source")
    if source is not None and not isinstance(source, str):
        raise GaugefixError(f"{where}: source must be a path or hub id, got {json_type(source)}")
    if "direction" in concept:
        d = concept["direction"]
        if (not isinstance(d, list) or not d or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in d)):
            raise GaugefixError(f"{where}: concept.direction must be a non-empty list of numbers")
        arr = np.asarray(d, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise GaugefixError(f"{where}: concept.direction holds NaN or infinite values")
        return Claim(layer, coords, direction=arr, source=source)
    if "positive" not in concept or "negative" not in concept:
        raise GaugefixError(f"{where}: the concept needs 'positive' and 'negative' prompts or a "
                            "'direction'")
    return Claim(layer, coords, positive=_prompts(concept["positive"], f"{where}: positive"),
                 negative=_prompts(concept["negative"], f"{where}: negative"), source=source)


def check_claim(claim: Claim, *, name: str, n_layers: int, d: int, vocab_size: int,
                max_positions: int | None = None, tokenizer: Any = None) -> None:
    """Refuse a claim that cannot be evaluated on a model (before any work is done); text
    prompts are measured once a ``tokenizer`` is given."""
    if claim.layer > n_layers:
        raise GaugefixError(f"the claim's layer {claim.layer} is out of range for {name} "
                            f"(residual positions 0..{n_layers})")
    bad = [i for i, _ in claim.coordinates if i >= d]
    if bad:
        raise GaugefixError(f"the claim's coordinate {bad[0]} is out of range for {name} "
                            f"(d={d})")
    if claim.k > d:
        raise GaugefixError(f"the claim names {claim.k} coordinates, more than d={d}")
    if claim.direction is not None and claim.direction.shape[0] != d:
        raise GaugefixError(f"the claim's direction has {claim.direction.shape[0]} entries, "
                            f"{name} has d={d}")
    for what, prompts in (("positive", claim.positive), ("negative", claim.negative)):
        for n, p in enumerate(prompts or []):
            if isinstance(p, list) and max(p) >= vocab_size:
                raise GaugefixError(f"{what}[{n}] has token id {max(p)}, outside the vocabulary "
                                    f"of {name} (0..{vocab_size - 1})")
            if isinstance(p, str) and tokenizer is None:
                continue
            length = len(p) if isinstance(p, list) else len(tokenizer(p)["input_ids"])
            if max_positions is not None and length > max_positions:
                raise GaugefixError(f"{what}[{n}] is {length} tokens long; {name} takes at most "
                                    f"{max_positions} positions")


def _encode(prompts: list[Any], tokenizer: Any) -> list[list[int]]:
    out = []
    for n, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise GaugefixError("text prompts need a tokenizer; give token-id lists instead")
            ids = list(tokenizer(p)["input_ids"])
            if not ids:
                raise GaugefixError(f"prompt {n} ({p!r}) encodes to no tokens")
            out.append(ids)
        else:
            out.append([int(t) for t in p])
    return out


def same_length_batches(model: torch.nn.Module, prompts: Sequence[Sequence[int]]
                        ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The prompts batched by length (equal lengths batch without padding): each batch's
    prompt indices and its token ids on the model's device."""
    by_len: dict[int, list[int]] = {}
    for n, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(n)
    device = next(model.parameters()).device
    for idx in by_len.values():
        yield idx, torch.tensor([list(prompts[i]) for i in idx], device=device)


@torch.no_grad()
def last_token_states(model: torch.nn.Module, prompts: list[list[int]],
                      position: int) -> torch.Tensor:
    """Residual at ``position`` (0 = embeddings, l = after layer l) at each prompt's last token."""
    from .stats import ResidualTap

    out = torch.empty(len(prompts), hidden_size_of(model.config), dtype=torch.float64)
    with ResidualTap(model, detect_family(model.config), [position]) as tap:
        for idx, batch in same_length_batches(model, prompts):
            getattr(model, "base_model", model)(input_ids=batch)
            out[idx] = tap.take()[position][:, -1].double().cpu()
    return out


def concept_direction(model: torch.nn.Module, claim: Claim, tokenizer: Any = None
                      ) -> torch.Tensor:
    pos = last_token_states(model, _encode(claim.positive or [], tokenizer), claim.layer)
    neg = last_token_states(model, _encode(claim.negative or [], tokenizer), claim.layer)
    return pos.mean(0) - neg.mean(0)


def top_coordinates(direction: torch.Tensor | np.ndarray, k: int) -> list[tuple[int, int]]:
    d = torch.as_tensor(np.asarray(direction))
    idx = torch.argsort(d.abs(), descending=True)[:k]
    return [(int(i), 1 if float(d[i]) >= 0 else -1) for i in idx]


def derive_claim(model: torch.nn.Module, *, layer: int, positive: list[Any],
                 negative: list[Any], k: int, tokenizer: Any = None,
                 source: str | None = None) -> Claim:
    """The top-k signed coordinates of a contrast concept on ``model`` (a claim to audit)."""
    c = Claim(layer, [(0, 1)], positive=positive, negative=negative, source=source)
    c.coordinates = top_coordinates(concept_direction(model, c, tokenizer), k)
    return c


def carry(coords: list[tuple[int, int]], gauge: SignedPerm) -> list[tuple[int, int]]:
    """Claimed (index, sign) pairs expressed in the chart the gauge maps to."""
    i, s = gauge.index_map([j for j, _ in coords])
    return [(int(a), int(b) * sign) for a, b, (_, sign) in zip(i, s, coords, strict=True)]


def reproduction(claimed: list[tuple[int, int]], derived: list[tuple[int, int]]) -> float:
    return len(set(claimed) & set(derived)) / len(claimed)


@dataclass
class AuditRow:
    model: str
    gauge: str  # "estimated", "random B_d #k", "random S_d #k"
    raw: float
    transported: float
    gauge_accuracy: float | None = None  # of the explicit gauge, when the truth is known


@dataclass
class AuditReport:
    claim_k: int
    layer: int
    rows: list[AuditRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.claim_k, "layer": self.layer, "rows": [asdict(r) for r in self.rows]}

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for kind in ("estimated", "random B_d", "random S_d"):
            rows = [r for r in self.rows if r.gauge.startswith(kind)]
            if rows:
                out[kind] = {"raw": float(np.mean([r.raw for r in rows])),
                             "transported": float(np.mean([r.transported for r in rows]))}
        return out


def audit_models(claim: Claim, models: list[tuple[str, torch.nn.Module, SignedPerm]], *,
                 n_gauges: int = 4, seed: int = 0, tokenizer: Any = None) -> AuditReport:
    """Audit ``claim`` on ``(name, model, gauge source→model)`` triples.

    Each model is audited as it is (with its estimated gauge) and under ``n_gauges``
    random B_d and random S_d×{±1} re-gaugings R (explicit gauge: estimated, then R). The
    concept is derived once per model: a re-gauged copy R·M computes R times M's residuals
    exactly (test_families checks it for every family), so what it would re-derive is R
    applied to M's direction, and no copy of the model is made (nor loaded: the models may
    be offloaded to disk).
    """
    report = AuditReport(claim.k, claim.layer)
    rng = np.random.default_rng(seed)
    for name, model, est in models:
        fam = detect_family(model.config)
        variants: list[tuple[str, SignedPerm]] = [("estimated", SignedPerm.identity(est.d))]
        for n in range(n_gauges):
            s = int(rng.integers(2**31))
            if fam.allows_signs:
                variants.append((f"random B_d #{n}", SignedPerm.random(est.d, s)))
            variants.append((f"random S_d #{n}", SignedPerm.random(est.d, s, kind="global")))
        if claim.direction is not None:  # a direction in the source chart, moved along
            own, moved = torch.from_numpy(claim.direction), est
        else:  # the concept as the model itself carries it
            own, moved = concept_direction(model, claim, tokenizer), SignedPerm.identity(est.d)
        for label, r in variants:
            explicit = est.then(r)
            derived = top_coordinates(moved.then(r).apply(own), claim.k)
            report.rows.append(AuditRow(name, label, reproduction(claim.coordinates, derived),
                                        reproduction(carry(claim.coordinates, explicit),
                                                     derived)))
    return report
