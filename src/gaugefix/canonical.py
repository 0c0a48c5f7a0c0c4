"""A canonical chart for every checkpoint, computed from its own weights.

Any two gauge-equivalent checkpoints (one element of the family's group applied to the other)
are written by :func:`canonicalize` as byte-identical weight files. The rule works on the raw
bits of the weights, which a gauge moves exactly, so no statistic can fall "within rounding"
of a decision boundary:

1. **Signs** (B_d families). Each residual coordinate owns a *slice* of every signed tensor
   (its embedding column, its rows of the writers, its columns of the readers, its LayerNorm
   bias entry). Read in a fixed order (tensors by name; within a tensor, a fixed block of
   entries, growing), the coordinate's first nonzero entry decides: its sign bit is cleared.
   (An all-zero slice: its first entry's, so that +0.0 and -0.0 agree too.)
2. **Order.** Coordinates are sorted by their norm gains (every norm, as bits), then by their
   sign-normalised slices, read deeper only while two coordinates still tie. Coordinates whose
   normalised slices are identical everywhere are interchangeable: either order gives the
   same bytes.
3. **Global sign** (S_d×{±1} families, LayerNorm). Both signs are sorted as above; the one
   whose sorted content is smaller (as bits) is taken; equal content means the flip is a
   symmetry of the weights.

What the weights do not determine is said, never hidden: coordinates with equal gains in
every norm can also be rotated among themselves without changing the function (a continuous
O(k) symmetry the discrete chart cannot fix), and a checkpoint whose gains are all equal (an
untrained or gain-free model: O(d)) has no canonical chart at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arch import Family
from .errors import GaugefixError
from .group import SignedPerm
from .model import Model, ModelLike, open_model
from .relation import DEFAULT_ALPHA

# entries read along each non-residual axis at each depth; the last depth reads everything
_DEPTHS = (2, 16, 256, None)


@dataclass
class CanonicalChart:
    """The gauge from a checkpoint's chart to its canonical chart, and what it leaves open."""

    gauge: SignedPerm
    family: str
    interchangeable: list[list[int]] = field(default_factory=list)  # identical slices
    rotatable: list[list[int]] = field(default_factory=list)  # equal gains in every norm
    sign_symmetric: bool = False  # LayerNorm: the global flip leaves the weights as they are
    # a quantised model (GGUF): the tensors the chart could not reach exactly in the format,
    # requantised (TensorMove.to_dict rows); empty: every byte moved exactly
    requantised: list[dict[str, Any]] = field(default_factory=list)

    @property
    def defined(self) -> bool:
        """Whether this is a canonical chart of the model (False: of its signed permutations
        only, every gain being equal)."""
        return not (self.rotatable and len(self.rotatable[0]) == self.gauge.d)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "canonical": self.defined,
                "gauge": self.gauge.to_json(), "open": self.describe()}

    def describe(self) -> list[str]:
        """One line per thing the weights leave open (empty: the chart is unique)."""
        lines = []
        if self.requantised:
            errors = [r["error"] for r in self.requantised if "error" in r]
            worst = f" (relative error up to {max(errors):.3g})" if errors else ""
            lines.append(f"{len(self.requantised)} quantised tensors could not move exactly "
                         f"(their blocks run along the residual axis) and were requantised"
                         f"{worst}: a re-gauged copy of this model reaches the same bytes only "
                         "if it was re-gauged exactly")
        if not self.defined:
            return [f"every gain is equal: rotations of the whole residual stream (O("
                    f"{self.gauge.d})) preserve the function; this chart is canonical for "
                    "signed permutations only", *(
                        [f"coordinates {_short(g)} have identical weights: exchanging them "
                         "changes no byte" for g in self.interchangeable])]
        for group in self.rotatable:
            lines.append(f"coordinates {_short(group)} have equal gains in every norm: "
                         f"rotations among them (O({len(group)})) preserve the function; the "
                         "canonical chart fixes only their signed permutations")
        for group in self.interchangeable:
            lines.append(f"coordinates {_short(group)} have identical weights: exchanging "
                         "them changes no byte")
        if self.sign_symmetric:
            lines.append("the global sign flip leaves the weights unchanged")
        return lines


def _short(group: list[int], n: int = 8) -> str:
    return ", ".join(map(str, group[:n])) + (" ..." if len(group) > n else "")


def _bits(t: Any) -> np.ndarray:
    """A torch tensor's raw bits as an unsigned numpy integer array (sign bit on top)."""
    import torch

    size = t.element_size()
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    signed = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    if t.dtype == torch.bool:
        return t.numpy().astype(np.uint8)
    return t.contiguous().view(signed).numpy().view(unsigned)


def _block(model: Model, key: str, axis: int, depth: int | None, d: int) -> np.ndarray:
    """[d, n] bits: the tensor's entries at each residual coordinate, the first ``depth``
    along every other axis (all of them when None), in a fixed order (read lazily)."""
    shape = model.shapes[key]
    idx = tuple(slice(0, d) if a == axis else slice(0, depth) for a in range(len(shape)))
    return np.moveaxis(_bits(model.slice(key, idx)), axis, 0).reshape(d, -1)


def _groups(keys: np.ndarray, order: np.ndarray) -> list[list[int]]:
    """Runs of equal rows of ``keys`` in ``order`` (original indices), longer than one."""
    if keys.shape[1] == 0:
        return [sorted(order.tolist())]
    ranked = keys[order]
    same = np.all(ranked[1:] == ranked[:-1], axis=1)
    out, run = [], [int(order[0])]
    for k, eq in enumerate(same, start=1):
        if eq:
            run.append(int(order[k]))
        else:
            if len(run) > 1:
                out.append(sorted(run))
            run = [int(order[k])]
    if len(run) > 1:
        out.append(sorted(run))
    return out


def _sort(keys: np.ndarray) -> np.ndarray:
    """Rows of ``keys`` in lexicographic order (first column first); ties keep index order."""
    if keys.shape[1] == 0:
        return np.arange(keys.shape[0])
    return np.lexsort(keys.T[::-1])


def canonical_chart(model: ModelLike, *, discrete_only: bool = False) -> CanonicalChart:
    """The gauge into ``model``'s canonical chart (a checkpoint directory, hub id or loaded
    model), from its weights alone. Refuses (GaugefixError) where no canonical chart exists:
    all gains equal (untrained, or a family without gains), so rotations of the whole stream
    are symmetries too; ``discrete_only`` then gives the chart that is canonical for the
    signed-permutation gauges alone (and says so in :meth:`CanonicalChart.describe`)."""
    m = open_model(model).check()
    for flag in {discrete_only, False}:  # a chart computed without refusing serves both
        if ("chart", flag) in m.memo:  # a copy: callers fill in what they requantised
            return dataclasses.replace(m.memo["chart", flag])
    fam, d, name = m.family, m.hidden_size, m.name
    try:
        keys = sorted(m.shapes)
        plan = m.plan
        # the chart is read from tensors with one residual axis of width d; a residual map
        # (HH, both axes) or a concatenation of streams (blocks) is only carried along
        single = {k for k in keys if plan[k].one_stream}
        gains = [k for k in keys if plan[k].kind == "G" and k in single]
        signed = [k for k in keys if plan[k].signed and k in single]
        if not signed:
            raise GaugefixError(f"{name}: no residual tensor carries a sign")
        gain_bits = (np.stack([_block(m, k, 0, None, d)[:, 0] for k in gains], 1)
                     if gains else np.zeros((d, 0), np.uint64)).astype(np.uint64)
        rotatable = _groups(gain_bits, _sort(gain_bits))
        if rotatable and len(rotatable[0]) == d and not discrete_only:
            raise GaugefixError(
                f"{name}: every norm gain is the same at every coordinate (an untrained or "
                f"gain-free {fam.name} model): rotations of the whole residual stream (O({d})) "
                "preserve its function, so the canonical chart is not defined (--discrete-only: "
                "the chart canonical for signed permutations alone)")
        chart = _chart(m, fam, d, signed, gain_bits, rotatable, plan)
        m.memo["chart", discrete_only] = dataclasses.replace(chart)
        return chart
    finally:
        m.close()


def _chart(m: Model, fam: Family, d: int, signed: list[str], gain_bits: np.ndarray,
           rotatable: list[list[int]], plan: dict[str, Any]) -> CanonicalChart:
    for depth in _DEPTHS:
        blocks = [_block(m, k, plan[k].residual_axis, depth, d) for k in signed]
        raw = np.concatenate([b.astype(np.uint64) for b in blocks], 1)
        top = np.concatenate([np.full(b.shape[1], 8 * b.dtype.itemsize - 1, np.uint64)
                              for b in blocks])
        chart = _decide(fam, raw, np.uint64(1) << top, gain_bits, rotatable,
                        last=depth is None)
        if chart is not None:
            return chart
    raise AssertionError("the last depth decides")  # pragma: no cover


def _decide(fam: Family, raw: np.ndarray, mask: np.ndarray, gain_bits: np.ndarray,
            rotatable: list[list[int]], *, last: bool) -> CanonicalChart | None:
    """The chart from these columns (``mask``: each column's sign bit), or None where the
    columns read so far leave a sign or an order open and deeper ones can settle it."""
    d = raw.shape[0]
    if fam.allows_signs:
        nonzero = (raw & ~mask) != 0  # magnitude: a flip turns +0.0 into -0.0
        if not last and not nonzero.any(1).all():
            return None
        first = nonzero.argmax(1)  # an all-zero slice: its first entry's sign bit decides
        rows = np.arange(d)
        negative = (raw[rows, first] & mask[first]) != 0
        norm = np.where(negative[:, None], raw ^ mask, raw)
        keys = np.concatenate([gain_bits, norm], 1)
        order = _sort(keys)
        ties = _groups(keys, order)
        if ties and not last:
            return None
        # canonical coordinate i is the checkpoint's order[i], with its sign made positive
        return CanonicalChart(SignedPerm(order, np.where(negative, -1, 1)[order]), fam.name,
                              ties, rotatable)
    cands = []
    for s in (1, -1):
        keys = np.concatenate([gain_bits, raw ^ mask if s < 0 else raw], 1)
        order = _sort(keys)
        cands.append((keys[order].ravel(), s, order, _groups(keys, order)))
    diff = np.flatnonzero(cands[0][0] != cands[1][0])
    if diff.size:
        k = diff[0]
        _, s, order, ties = min(cands, key=lambda c: c[0][k])
    else:
        _, s, order, ties = cands[0]
    if (ties or not diff.size) and not last:
        return None
    return CanonicalChart(SignedPerm(order, np.full(d, s)), fam.name, ties, rotatable,
                          sign_symmetric=not diff.size)


def canonicalize(model: ModelLike, out: str | Path, *, overwrite: bool = False,
                 progress: bool = False, discrete_only: bool = False) -> CanonicalChart:
    """Write ``model`` in its canonical chart to ``out`` (atomically, as ``apply`` does)."""
    from .apply import gauge_checkpoint

    m = open_model(model)
    chart = canonical_chart(m, discrete_only=discrete_only)
    # a GGUF output records no gauge or source: re-gauged copies give the same bytes
    rep = gauge_checkpoint(m, out, chart.gauge, overwrite=overwrite, progress=progress,
                           record={"chart": "canonical"})
    chart.requantised = rep.requantised
    return chart


# ---------------------------------------------------------------------------- fingerprints
FINGERPRINT_VERSION = "gf1"


def _tensor_digests(model: Model, gauge: SignedPerm
                    ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """sha256 of each tensor's bytes in the chart ``gauge`` leads to (name order-free: one
    digest per tensor, after its dtype and shape), streamed in blocks through the primitive
    (:func:`gaugefix.shards.stream` into a digest sink)."""
    import hashlib

    from .apply import plan_checkpoint
    from .shards import DigestSink, gauge_moves, read_layout, stream, torch_dtype

    if model.gguf is not None:  # the packed bytes each tensor has in the chart
        out = {}
        requantised = []
        for t, data, rec in model.gguf.moves(model.plan, gauge, measure="none"):
            h = hashlib.sha256(f"{t.tensor_type.name} {list(data.shape)}".encode())
            h.update(np.ascontiguousarray(data).view(np.uint8).data)
            out[model.gguf.names[t.name]] = h.hexdigest()
            if rec.how == "requantised":
                requantised.append(rec.to_dict())
        return out, requantised
    if model.checkpoint is not None and model.hf_quant is not None:
        return _hf_quant_digests(model, gauge)
    ck = model.checkpoint
    if ck is None:
        raise GaugefixError(f"{model.name}: a fingerprint is of a checkpoint on disk")
    plan = plan_checkpoint(ck, gauge)
    if not ck.is_safetensors:  # legacy torch files: whole tensors
        out = {}
        for key, t in ck.iter_tensors():
            moved = plan[key](gauge, t).contiguous()
            h = hashlib.sha256(f"{moved.dtype} {list(moved.shape)}".encode())
            h.update(_bits(moved).tobytes())
            out[key] = h.hexdigest()
        return out, []
    sink = DigestSink(lambda e: f"{torch_dtype(e.dtype)} {list(e.shape)}".encode())
    for shard in ck.shards:
        layout = read_layout(shard)
        stream(shard, gauge_moves(plan, gauge, layout), sink, layout=layout)
    return sink.digests, []


def _hf_quant_digests(model: Model, gauge: SignedPerm
                      ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """A HF quantised checkpoint: per logical tensor, sha256 of what it is in the chart, and
    the tensors :func:`.quant.hf.move` would requantise to get there. A quantised Linear is
    hashed as its stored tensors' roles, dtypes and shapes and its dequantised values moved
    exactly (float32): the packed bytes the chart's move reaches are not a function of the
    values alone (a sign is a negated group scale or mirrored codes, a cell whose mirror
    does not fit is requantised, g_idx labels follow the path), so an exactly re-gauged
    copy would not always reach the same bytes, while its dequantised values are, bit for
    bit, the input's moved. Any other tensor: its moved bytes."""
    import hashlib

    from .quant.hf_checkpoint import moves

    q = model.hf_quant
    assert q is not None
    plan = model.plan
    out, requantised = {}, []
    for key, tensors, rec, _ in moves(model, plan, gauge):
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name]
            role = name[len(key) - len("weight"):] if name != key else ""
            h.update(f"{role} {t.dtype} {list(t.shape)};".encode())
        if key in q.groups:
            h.update(q.name.encode())
            h.update(_bits(plan[key](gauge, model.tensor(key)).contiguous()).tobytes())
        else:
            h.update(_bits(tensors[key]).tobytes())
        out[key] = h.hexdigest()
        if rec.how == "requantised":
            requantised.append(rec.to_dict(round_trip=False))
    return out, requantised


@dataclass
class Fingerprint:
    """A checkpoint's gauge-invariant identity: ``fingerprint`` (short) and ``sha256`` (full)
    hash every tensor's name, dtype, shape and bytes in the canonical chart, so re-gauged
    copies share them and any change of a weight changes them; ``fuzzy``: each norm's sorted
    gains at 17 quantiles, close for near relatives (a prefilter, not a verdict)."""

    fingerprint: str
    sha256: str
    family: str
    hidden_size: int
    chart: CanonicalChart
    tensors: dict[str, str]
    fuzzy: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "sha256": self.sha256, "family": self.family,
                "hidden_size": self.hidden_size, "canonical": self.chart.defined,
                "open": self.chart.describe(), "fuzzy": self.fuzzy}


def fingerprint(model: ModelLike, *, discrete_only: bool = False) -> Fingerprint:
    """The fingerprint of a checkpoint on disk (see :class:`Fingerprint`)."""
    import hashlib
    import json

    m = open_model(model)
    for flag in {discrete_only, False}:  # a chart computed without refusing serves both
        if ("fingerprint", flag) in m.memo:
            return m.memo["fingerprint", flag]
    chart = canonical_chart(m, discrete_only=discrete_only)
    digests, chart.requantised = _tensor_digests(m, chart.gauge)
    shapes = {k: (str(s)) for k, s in m.shapes.items()}
    doc = [[k, shapes[k], digests[k]] for k in sorted(digests)]
    full = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, chart.family, doc]).encode()
                          ).hexdigest()
    fuzzy = {}
    try:
        import torch

        for key in sorted(m.shapes):
            if m.plan[key].kind == "G":
                g = m.slice(key, (slice(None),)).to(torch.float64)
                q = torch.linspace(0, 1, 17, dtype=torch.float64)
                fuzzy[key] = [round(float(v), 6) for v in torch.quantile(g, q)]
    finally:
        m.close()
    fp = Fingerprint(f"{FINGERPRINT_VERSION}:{full[:32]}", full, chart.family, m.hidden_size,
                     chart, digests, fuzzy)
    m.memo["fingerprint", discrete_only] = fp
    return fp


# ---------------------------------------------------------------------------- identity
@dataclass
class Identity:
    """``verdict``: same (one function up to gauge), derived, or unrelated; ``gauge``: A → B
    (None when unrelated); ``evidence``: what the verdict rests on."""

    verdict: str
    reason: str
    gauge: SignedPerm | None
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason,
                "gauge": None if self.gauge is None else self.gauge.to_json(), **self.evidence}


def _relative_distances(a: Model, b: Model, gauge: SignedPerm) -> dict[str, float]:
    """Per tensor: ||B - g(A)|| / max(||A||, ||B||), tensor by tensor (one pair in memory,
    float64 a row block at a time)."""
    from .relation import relative_distance

    return {key: relative_distance(op, a.tensor(key), b.tensor(key), gauge, a.hidden_size)
            for key, op in a.plan.items()}


# a quantised tensor is "that tensor, rounded" when its error is within this many times the
# rounding its type is expected to cost (a uniform grid over each block's range); a float
# tensor (GGUF keeps norms in F32) when within float32 rounding
ROUNDING_FACTOR = 2.0
FLOAT_MATCH = 1e-6


def _float_match(a: Model, b: Model, key: str) -> float:
    """How far a float tensor may differ and still be "the same": :data:`FLOAT_MATCH`, or
    the rounding of the coarser of the two stored dtypes (a GPTQ file keeps its unquantised
    tensors in float16 where the original may be bfloat16)."""
    import torch

    eps = FLOAT_MATCH
    for m in (a, b):
        dt = m.slice(key, (slice(0, 1),)).dtype
        if dt.is_floating_point:
            eps = max(eps, torch.finfo(dt).eps)
    return eps


def _up_to_quantisation(a: Model, b: Model, gauge: SignedPerm, dist: dict[str, float]
                        ) -> dict[str, Any] | None:
    """Whether B differs from A (moved by ``gauge``) by no more than the quantisation of the
    quantised one of them: None when neither is quantised."""
    from functools import partial

    from .quant import gguf_file, hf
    from .relation import moved_rows

    types: dict[str, str] = {}  # key -> the type of whichever side quantised it
    noise_of: dict[str, Any] = {}  # key -> rows -> (expected squared error, squared norm)
    for m in (a, b):
        if m.gguf is not None:
            for k, t in m.gguf.types.items():
                if t in m.gguf.quantised:
                    types[k] = t
                    noise_of[k] = partial(gguf_file.rounding_noise_parts, tname=t)
        elif (q := m.hf_quant) is not None:
            for k in q.groups:
                types[k] = q.name
                noise_of[k] = partial(hf.rounding_noise_parts, q.scheme)
    if not types:
        return None
    ratios = {}
    within = True
    for key, d in dist.items():
        if key not in types:
            within &= d <= _float_match(a, b, key)
            continue
        noise = norm = 0.0  # g(A) a block of rows at a time, in float64
        for rows in moved_rows(a.plan[key], a.tensor(key), gauge, a.hidden_size):
            n, m = noise_of[key](rows)
            noise, norm = noise + n, norm + m
        bound = math.sqrt(noise / norm) if norm > 0 else 0.0
        ratios[key] = d / bound if bound > 0 else (0.0 if d == 0 else float("inf"))
        within &= ratios[key] <= ROUNDING_FACTOR
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"within": bool(within), "types": ", ".join(f"{t} ×{n}" for t, n in
                                                        sorted(counts.items())),
            "max_ratio": max(ratios.values()) if ratios else 0.0,
            "factor": ROUNDING_FACTOR}


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise GaugefixError(f"alpha must be a probability strictly between 0 and 1, not "
                            f"{alpha!r}")
    return float(alpha)


def identify(a: ModelLike, b: ModelLike, *, alpha: float = DEFAULT_ALPHA) -> Identity:
    """Whether B is A up to gauge, derived from A, or unrelated, from the weights alone.

    ``same``: bit-identical canonical forms (exact). ``derived``: the held-out test of
    :func:`gaugefix.relation.relate` rejects "unrelated" at level ``alpha`` (its p-values,
    combined and per tensor group, are in the evidence), or B is A up to quantisation."""
    from .relation import relate

    alpha = _check_alpha(alpha)
    ca, cb = open_model(a).check(), open_model(b).check()
    if (differ := _shape_difference(ca, cb)) is not None:
        from .sketch import Sketch, relate_sketches

        rel, why = relate_sketches(Sketch.of(ca), Sketch.of(cb))
        return verdict_across(rel, why, alpha, {"differ": differ})
    fa = fingerprint(ca, discrete_only=True)
    fb = fingerprint(cb, discrete_only=True)
    if fa.sha256 == fb.sha256:
        gauge = fa.chart.gauge.then(fb.chart.gauge.inverse())
        return Identity("same", "every tensor is bit-identical after moving A into B's chart "
                        "(through both canonical charts)", gauge,
                        {"fingerprint": fa.fingerprint, "tensors_compared": len(fa.tensors),
                         "open": fa.chart.describe()})
    evidence: dict[str, Any] = {"fingerprint_a": fa.fingerprint,
                                "fingerprint_b": fb.fingerprint}
    rel = relate(ca, cb)
    if rel is None:
        return Identity("unrelated", "fewer than two tensors with one residual axis are "
                        "nonzero in both models: nothing to align on and test on", None,
                        evidence)
    result = rel.match
    dist = _relative_distances(ca, cb, result.gauge)
    median = float(np.median(list(dist.values())))
    evidence.update(rel.evidence(alpha))
    evidence.update({"median_relative_distance": median,
                     "max_relative_distance": max(dist.values()),
                     "confidence": result.summary(),
                     "median_alignment_confidence": result.summary()["median_confidence"],
                     "relative_distance": {k: round(v, 6) for k, v in sorted(dist.items())}})
    quantised = _up_to_quantisation(ca, cb, result.gauge, dist)
    if quantised is not None:
        evidence["quantisation"] = quantised
        if quantised["within"]:
            return Identity("derived", f"the same network up to {quantised['types']} "
                            f"quantisation: after alignment every quantised tensor differs by "
                            f"at most {quantised['max_ratio']:.2g}× the rounding its type "
                            f"costs (median relative error {median:.3g}), every other tensor "
                            "by float rounding only", result.gauge, evidence)
    held_out = (f"aligned on half of the tensors, the other half agree with mean cosine "
                f"{rel.mean_cosine:.3g} over {rel.tensors} tensors (p = {_p(rel)}")
    agree = (f"; the two halves' gauges map {rel.fold_agreement} of {ca.hidden_size} "
             "coordinates alike")
    if rel.p_value <= alpha:
        return Identity("derived", f"{held_out} ≤ α = {alpha:g}){agree}", result.gauge,
                        evidence)
    return Identity("unrelated", f"{held_out} > α = {alpha:g}: no better than a random "
                    f"gauge){agree}", None, evidence)


def write_record(model: ModelLike, output: str | Path, *, discrete_only: bool = False,
                 overwrite: bool = False) -> Fingerprint:
    """Write ``model``'s fingerprint record (:class:`gaugefix.sketch.Sketch` with the
    fingerprint and canonical gauge): what ``identify --against`` tests a suspect against,
    without the model's weights. Atomic; returns the fingerprint."""
    from .io import atomic_file
    from .sketch import Sketch

    m = open_model(model).check()
    fp = fingerprint(m, discrete_only=discrete_only)
    sketch = Sketch.of(m)
    sketch.fingerprint, sketch.sha256 = fp.fingerprint, fp.sha256
    sketch.chart_gauge = fp.chart.gauge
    inputs = [m.path] if m.path is not None else []
    with atomic_file(output, overwrite=overwrite, inputs=inputs) as tmp:
        sketch.save(tmp)
    return fp


@dataclass
class AgainstOne:
    """One reference's verdict for the suspect (A: the reference, B: the suspect)."""

    reference: str
    path: Path
    identity: Identity
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "record": str(self.path),
                "seconds": round(self.seconds, 3), **self.identity.to_dict()}


def record_files(folder: str | Path) -> list[Path]:
    """The fingerprint records of ``folder``, or one error naming every entry that is not
    one: each entry must be a regular ``*.safetensors`` file (after links) whose header says
    it is a record (a README, a dangling or looping link, a FIFO, a link to a device, a
    subfolder: refused, never skipped silently and never opened if not a regular file).
    Only headers are read here: the records themselves are read one at a time."""
    from .sketch import Sketch

    p = Path(folder)
    if not p.is_dir():
        raise GaugefixError(f"--against {p}: not a directory of fingerprint records")
    files, bad = [], []
    for f in sorted(p.iterdir()):
        try:
            if f.suffix != ".safetensors":
                kind = "a folder" if f.is_dir() else "an entry"
                raise GaugefixError(f"{f}: {kind} that is not a *.safetensors fingerprint "
                                    "record")
            Sketch.check_record(f)
            files.append(f)
        except GaugefixError as exc:
            bad.append(str(exc))
    if bad:
        raise GaugefixError(f"--against {p}: {len(bad)} entries are not fingerprint records "
                            f"({'; '.join(bad[:6])}{' ...' if len(bad) > 6 else ''})")
    if not files:
        raise GaugefixError(f"--against {p}: no *.safetensors fingerprint records in it "
                            "(write them with `gaugefix fingerprint MODEL --record FILE`)")
    return files


def identify_against(suspect: ModelLike, folder: str | Path, *, alpha: float = DEFAULT_ALPHA
                     ) -> list[AgainstOne]:
    """The suspect against every fingerprint record of ``folder``: ``same`` where its
    fingerprint is the record's, else the test of :func:`gaugefix.sketch.relate_sketches`
    on the suspect's sketch and the record's. Every entry of the folder is checked before
    any test runs (:func:`record_files`: one error naming all that are not records); the
    records are then read one at a time, so memory does not grow with the folder."""
    import time

    from .sketch import Sketch, relate_sketches

    alpha = _check_alpha(alpha)
    paths = record_files(folder)
    m = open_model(suspect).check()
    fp = fingerprint(m, discrete_only=True)
    mine = Sketch.of(m)
    out = []
    for path in paths:
        t0 = time.perf_counter()
        ref = Sketch.load(path)
        if ref.sha256 == fp.sha256 and ref.chart_gauge is not None:
            ident = Identity("same", "the suspect's fingerprint is the record's: every tensor "
                             "is bit-identical in the canonical chart", ref.chart_gauge.then(
                                 fp.chart.gauge.inverse()), {"fingerprint": fp.fingerprint})
        else:
            rel, why = relate_sketches(ref, mine)
            differ = None if (ref.family, ref.hidden_size) == (mine.family, mine.hidden_size) \
                else f"{ref.family} d={ref.hidden_size} and {mine.family} d={mine.hidden_size}"
            ident = verdict_across(rel, why, alpha, {"differ": differ} if differ else {})
        out.append(AgainstOne(ref.name, path, ident, time.perf_counter() - t0))
        del ref  # one record in memory at a time
    order = {"same": 0, "derived": 1, "unrelated": 2}
    out.sort(key=lambda r: (order[r.identity.verdict],
                            r.identity.evidence.get("log10_p_value", 0.0), r.reference))
    return out


def _shape_difference(a: Model, b: Model) -> str | None:
    """How two models' shapes differ (None: one family, width and tensor set)."""
    if a.family.name != b.family.name:
        return f"different families: {a.family.name} and {b.family.name}"
    if a.hidden_size != b.hidden_size:
        return f"different widths: d={a.hidden_size} and d={b.hidden_size}"
    sa, sb = a.shapes, b.shapes
    if sa != sb:
        diff = sorted(set(sa) ^ set(sb)) or sorted(k for k in sa if sa[k] != sb[k])
        return f"{len(diff)} tensors differ in name or shape (e.g. {diff[0]})"
    return None


def verdict_across(rel: Any, why: str, alpha: float, evidence: dict[str, Any]) -> Identity:
    """The verdict of :func:`gaugefix.sketch.relate_sketches` (``rel``: a CrossRelation, or
    None and ``why``): derived when its p-value is at most ``alpha``."""
    differ = evidence.get("differ")
    lead = f"{differ}; " if differ else ""
    if rel is None:
        return Identity("unrelated", f"{lead}{why}", None, evidence)
    evidence.update(rel.evidence(alpha))
    c = rel.coordinates
    evidence["coordinate_map"] = {"b": c.b.tolist(), "a": c.a.tolist(),
                                  "sign": c.sign.astype(int).tolist()}
    held_out = (f"coordinates matched on {c.shared_tokens:,} shared sampled tokens, "
                f"{rel.tensors} held-out layer tensors agree with mean cosine "
                f"{rel.mean_cosine:.3g} (p = {_p(rel)}")
    if rel.p_value <= alpha:
        found = rel.describe()
        return Identity("derived", f"{found + ': ' if found else ''}{held_out} ≤ α = "
                        f"{alpha:g})", rel.gauge(), evidence)
    return Identity("unrelated", f"{lead}{held_out} > α = {alpha:g}: no better than a random "
                    "map)", None, evidence)


def _p(rel: Any) -> str:
    """A p-value as text, however small (its log10 when below float range)."""
    if rel.p_value > 0:
        return f"{rel.p_value:.2g}"
    return f"10^{rel.log10_p_value:.0f}"
