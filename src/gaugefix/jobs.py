"""One library call per job: what each ``gaugefix`` command computes, as a Python function.

Each function opens its inputs once (:func:`gaugefix.model.open_model`; pass an opened
:class:`~gaugefix.model.Model` to share one between jobs), does the whole job and returns a
complete result: the gauge or the verdict, its confidence, the metadata the output file
records and the tables a command prints, as data. Files are written by the result's
``save`` (or, for jobs whose output is a checkpoint, by the job itself, atomically). The
command line is a thin layer over these::

    from gaugefix import jobs

    est = jobs.match("ckpt-a", "ckpt-b", source="weights")
    est.gauge, est.summary()["n_low_confidence"]
    est.save("a_to_b.json")
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GaugefixError
from .group import SignedPerm
from .io import json_safe
from .model import Model, ModelLike, check_pair, open_model

if TYPE_CHECKING:
    from .apply import ApplyReport
    from .audit import AuditReport, Claim
    from .canonical import AgainstOne, CanonicalChart, Fingerprint, Identity
    from .diagnosis import GaugeGroupReport
    from .estimate import StatsOptions, TrajectoryResult
    from .match import MatchResult
    from .stats import CrossStats


def stats_options(*, tokens: str | Path | np.ndarray | None = None, n_tokens: int = 16384,
                  layers: str | Sequence[int] | None = None,
                  max_memory: str | int | None = None, **options: Any) -> StatsOptions:
    """:class:`~gaugefix.estimate.StatsOptions` from what a user types: ``layers`` as
    ``"0,4,8"``, ``max_memory`` as ``"4GB"``; the other options as the class takes them."""
    from .estimate import StatsOptions
    from .layerwise import parse_size

    positions = None
    if isinstance(layers, str):
        try:
            positions = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise GaugefixError(f"--layers must be comma-separated integers, got {layers!r}"
                                ) from None
    elif layers is not None:
        positions = list(layers)
    budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    return StatsOptions(tokens=tokens, n_tokens=n_tokens, positions=positions,
                        max_memory=budget, **options)


# ---------------------------------------------------------------------------- inspect
def inspect(model: ModelLike) -> GaugeGroupReport:
    """Family, norm, width, gauge group and gain diagnosis (``gaugefix inspect``)."""
    from .diagnosis import inspect_checkpoint

    return inspect_checkpoint(model)


# ---------------------------------------------------------------------------- match
@dataclass
class GaugeEstimate:
    """An estimated gauge A → B: ``result`` (the match, with every coordinate's confidence),
    ``metadata`` (what the gauge file records), ``threshold`` (below it a coordinate is
    flagged), ``agreement`` (per residual position: how its own gauge agrees with the
    combined one, when asked for)."""

    result: MatchResult
    metadata: dict[str, Any]
    threshold: float
    agreement: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gauge(self) -> SignedPerm:
        return self.result.gauge

    @property
    def confidence(self) -> np.ndarray:
        return self.result.confidence

    def summary(self) -> dict[str, Any]:
        return self.result.summary(self.threshold)

    def low_confidence(self) -> list[int]:
        return self.result.low_confidence(self.threshold)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        self.gauge.save(path, self.metadata, overwrite=overwrite)
        return Path(path)


def _positions_checked(opts: StatsOptions | None, *models: Model) -> None:
    from .stats import resolve_positions

    if opts is not None and opts.positions is not None:
        for m in models:
            resolve_positions(opts.positions, m.n_layers)


def match(a: ModelLike, b: ModelLike, *, source: str = "both", method: str = "signmarg",
          opts: StatsOptions | None = None,
          stats: CrossStats | Iterable[str | Path] | None = None, solver: str = "lapjvs",
          gain_weight: float = 0.0, features: int | None = 8192,
          min_confidence: float | None = None, agreement: bool = False,
          hash_weights: bool = True) -> GaugeEstimate:
    """The gauge A → B (``gaugefix match``). ``source``: both, activations, weights or
    pooled; ``stats``: saved statistics (or statistics files, added) instead of a forward
    pass; ``features``: weight-signature entries sampled (None: every entry);
    ``agreement``: also match each kept position alone and report its agreement."""
    from .estimate import check_choices, estimate_gauge, gauge_metadata, source_stats
    from .match import match_correlation
    from .stats import CrossStats, sum_stats

    check_choices(method, source, solver)
    ma, mb = open_model(a), open_model(b)
    for m in (ma, mb):
        m.check()
    fam, _ = check_pair(ma, mb)
    _positions_checked(opts, ma, mb)
    if stats is not None and not isinstance(stats, CrossStats):
        stats = sum_stats(CrossStats.load(p) for p in stats)
    if stats is None and source != "weights":
        stats = source_stats(ma, mb, source, opts)
    result = estimate_gauge(ma, mb, source=source, method=method, opts=opts, solver=solver,
                            gain_weight=gain_weight, features=features, stats=stats)
    extra: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if stats is not None:
        extra = {"n_tokens": stats.n_tokens, "positions": stats.positions}
        if agreement and stats.per_position:
            for p, mom in sorted(stats.per_position.items()):
                r = match_correlation(mom.correlation(), method,
                                      global_sign_only=not fam.allows_signs, solver=solver)
                rows.append({"position": p,
                             "full_agreement": r.gauge.compare(result.gauge)["full_accuracy"],
                             "mean_abs_corr": r.mean_abs_corr})
            extra["per_position_agreement"] = {str(r["position"]): r["full_agreement"]
                                               for r in rows}
    threshold = result.threshold if min_confidence is None else min_confidence
    meta = gauge_metadata(result, ma, mb, source=source, extra=extra, threshold=threshold,
                          hash_weights=hash_weights)
    return GaugeEstimate(result, meta, threshold, rows)


def collect_stats(a: ModelLike, b: ModelLike, opts: StatsOptions | None = None) -> CrossStats:
    """Cross-statistics of two residual streams (``gaugefix stats``): every position kept
    one by one, as :func:`match` weighs them (up to the in-memory budget)."""
    from .estimate import source_stats

    return source_stats(a, b, "both", opts)


# ---------------------------------------------------------------------------- trajectory
@dataclass
class TrajectoryEstimate:
    """The composed gauge CKPT_0 → CKPT_n: ``result`` (the local matches and the path),
    ``table`` (one row per step), ``confidence`` (per coordinate, the weakest step's),
    ``metadata`` (what the gauge file records)."""

    result: TrajectoryResult
    table: list[dict[str, Any]]
    confidence: np.ndarray
    threshold: float
    metadata: dict[str, Any]

    @property
    def gauge(self) -> SignedPerm:
        return self.result.gauge

    def low_confidence(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.confidence < self.threshold)]

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        self.gauge.save(path, self.metadata, overwrite=overwrite)
        return Path(path)


def trajectory(checkpoints: Sequence[ModelLike], *, source: str = "both",
               method: str = "signmarg", opts: StatsOptions | None = None,
               solver: str = "lapjvs", gain_weight: float = 0.0, bridge: bool = True,
               min_confidence: float | None = None) -> TrajectoryEstimate:
    """Match consecutive checkpoints (bridging weak steps) and compose (``gaugefix
    trajectory``): the gauge from the first checkpoint's chart to the last's."""
    from .estimate import check_choices, gauge_metadata
    from .estimate import trajectory as run

    check_choices(method, source, solver)
    models = [open_model(c) for c in checkpoints]
    for m in models:
        m.check()
    _positions_checked(opts, *models)
    res = run(models, source=source, method=method, opts=opts, solver=solver,
              gain_weight=gain_weight, bridge=bridge)
    threshold = res.threshold if min_confidence is None else min_confidence
    table = res.step_table(threshold)
    conf = res.confidence()
    bridges = [{"from": i, "to": j, "n_low_confidence": n} for (i, j), n in res.bridges.items()]
    meta = gauge_metadata(res.steps[0], models[0], models[-1], source=source,
                          extra={"steps": table, "composed_from": len(res.steps),
                                 "path": res.path, "bridges": bridges})
    meta["confidence"] = [round(float(c), 6) for c in conf]
    meta["summary"] = {"min_step_confidence": float(conf.min()),
                       "n_low_confidence": int((conf < threshold).sum()),
                       "low_confidence_threshold": threshold}
    return TrajectoryEstimate(res, table, conf, threshold, meta)


# ---------------------------------------------------------------------------- audit
@dataclass
class AuditResult:
    """``report`` (one row per model and gauge), ``source_reproduction`` (how much of the
    claim its own source reproduces: below 1, the claim is not the top-k of its own
    prompts), ``document`` (the JSON report)."""

    report: AuditReport
    source_reproduction: float | None
    document: dict[str, Any]

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        from .io import atomic_write_text

        return atomic_write_text(path, json.dumps(json_safe(self.document), indent=2) + "\n",
                                 overwrite=overwrite)


def _where(ref: str | Path) -> str:
    """One key for every name of a local directory (a hub id stays as it is)."""
    return str(Path(ref).resolve()) if Path(ref).exists() else str(ref)


def audit(claim: str | Path | Claim, models: Sequence[ModelLike], *,
          source: ModelLike | None = None, gauges: int = 4, seed: int = 0,
          opts: StatsOptions | None = None, fingerprints: bool = False) -> AuditResult:
    """Does an index-level claim reproduce by raw index, or only through the explicit gauge
    (``gaugefix audit``)? ``source``: the claim's checkpoint (default: the claim's
    ``source`` field); ``opts.max_memory``: every model's layers left on disk."""
    import torch

    from .audit import (
        audit_models,
        check_claim,
        concept_direction,
        load_claim,
        reproduction,
        top_coordinates,
    )
    from .estimate import StatsOptions, estimate_gauge

    c = claim if not isinstance(claim, str | Path) else load_claim(claim)
    src_ref = source if source is not None else c.source
    if src_ref is None:
        raise GaugefixError("the claim names no source checkpoint; pass --source")
    src = open_model(src_ref)
    opened = {_where(src_ref): src} if isinstance(src_ref, str | Path) else {}
    targets = []
    for ref in models:  # a checkpoint named twice (or as the source) is opened once
        if not isinstance(ref, str | Path):
            targets.append(open_model(ref))
            continue
        if _where(ref) not in opened:
            opened[_where(ref)] = open_model(ref)
        targets.append(opened[_where(ref)])
    opts = opts or StatsOptions()
    for m in (src, *targets):  # everything refused before any model is loaded
        m.check()
        check_claim(c, name=m.name, n_layers=m.n_layers, d=m.hidden_size,
                    vocab_size=m.vocab_size, max_positions=m.max_positions)
        if m.family.name != src.family.name or m.hidden_size != src.hidden_size:
            raise GaugefixError(f"{m.name} ({m.family.name}, d={m.hidden_size}) cannot be "
                                f"compared with the source {src.name} ({src.family.name}, "
                                f"d={src.hidden_size})")
    tokenizer = None
    if any(isinstance(p, str) for p in (c.positive or []) + (c.negative or [])):
        from .stats import load_tokenizer

        if src.tokenizer_dir is None:
            raise GaugefixError("the claim has text prompts and the source is a model in "
                                "memory: give token-id prompts")
        tokenizer = load_tokenizer(src.tokenizer_dir, why="the claim has text prompts")
        for m in (src, *targets):
            check_claim(c, name=m.name, n_layers=m.n_layers, d=m.hidden_size,
                        vocab_size=m.vocab_size, max_positions=m.max_positions,
                        tokenizer=tokenizer)
    with tempfile.TemporaryDirectory(prefix="gaugefix-offload-") as off:
        offloaded: dict[int, torch.nn.Module] = {}

        def load(m: Model) -> torch.nn.Module:  # whole, or every decoder layer left on disk
            if opts.max_memory is None or m.in_memory:
                return m.load("float32")
            if id(m) not in offloaded:
                from .layerwise import open_offloaded

                offloaded[id(m)] = open_offloaded(m, torch.float32,
                                                  Path(off) / str(len(offloaded))).model
            return offloaded[id(m)]

        source_model = load(src)
        own = None
        if c.direction is None:  # the claim checked on its own source first
            own = reproduction(c.coordinates, top_coordinates(
                concept_direction(source_model, c, tokenizer), c.k))
        triples = []
        for m in targets:
            model = load(m)
            same = m.path is not None and src.path is not None and \
                m.path.resolve() == src.path.resolve()
            est = SignedPerm.identity(m.hidden_size) if same else estimate_gauge(
                src, m, opts=opts).gauge
            triples.append((m.name, model, est))
        rep = audit_models(c, triples, n_gauges=gauges, seed=seed, tokenizer=tokenizer)
    doc = {**rep.to_dict(), "summary": rep.summary(),
           "claim": str(claim) if isinstance(claim, str | Path) else None,
           "source": src.name, "source_reproduction": own}
    if fingerprints:
        from .canonical import fingerprint

        doc["fingerprints"] = {m.name: fingerprint(m, discrete_only=True).fingerprint
                               for m in {id(m): m for m in (src, *targets)}.values()}
    return AuditResult(rep, own, doc)


# ---------------------------------------------------------------------------- apply
@dataclass
class ApplyResult:
    """``report`` (what was moved and written), ``gauge`` (the gauge applied),
    ``gauge_metadata`` (what ``gauge_out`` records: both charts' identities)."""

    report: ApplyReport
    gauge: SignedPerm
    gauge_metadata: dict[str, Any] | None = None


def apply(model: ModelLike, output: str | Path, gauge: SignedPerm | str | Path | None = None,
          *, random: int | None = None, kind: str | None = None,
          positive_fraction: float | None = None, gauge_out: str | Path | None = None,
          overwrite: bool = False, progress: bool = True) -> ApplyResult:
    """Write ``model`` in another chart (``gaugefix apply``): a gauge (or a gauge file), or
    a random gauge of the family's group drawn with seed ``random``. ``gauge_out``: also
    write the applied gauge, with both checkpoints' identities (hashed on the way);
    the two outputs are published together."""
    from .apply import gauge_checkpoint
    from .io import transaction

    if (gauge is None) == (random is None):
        raise GaugefixError("give exactly one of --gauge G.json or --random SEED")
    m = open_model(model)
    if gauge is not None:
        if kind is not None or positive_fraction is not None:
            raise GaugefixError("--kind and --positive-fraction only go with --random")
        g = gauge if isinstance(gauge, SignedPerm) else SignedPerm.load(gauge)
        method = "gauge" if isinstance(gauge, SignedPerm) else f"file:{gauge}"
    else:
        k = kind or ("signed" if m.family.allows_signs else "global")
        if k not in ("signed", "perm", "global"):
            raise GaugefixError(f"unknown random gauge kind {k!r}; choose from signed, perm, "
                                "global")
        g = SignedPerm.random(m.hidden_size, random, kind=k,  # type: ignore[arg-type]
                              positive_fraction=positive_fraction)
        method = f"random(seed={random}, kind={k})"
    with transaction():  # gauge_checkpoint checks the gauge against the family
        rep = gauge_checkpoint(m, output, g, overwrite=overwrite, progress=progress,
                               identities=gauge_out is not None)
        meta = None
        if gauge_out is not None:
            meta = {"source": m.identity(rep.source_blake3),
                    "target": {"name": str(output), "blake3": rep.blake3}, "method": method}
            if m.quantised:  # what moved exactly, what had to be requantised (and its cost)
                meta["quantised"] = {"exact": rep.n_tensors - len(rep.requantised),
                                     "requantised": rep.requantised}
            g.save(gauge_out, meta, overwrite=overwrite)
    return ApplyResult(rep, g, meta)


def verify(a: ModelLike, b: ModelLike, gauge: SignedPerm | str | Path, *,
           n_tokens: int = 256, tol: float | None = None, dtype: str = "float32",
           seed: int = 0) -> Any:
    """Does B compute A's function in chart B (``gaugefix verify``)? A
    :class:`~gaugefix.verify.VerifyReport`; ``tol`` defaults to the dtype's."""
    from .verify import verify_checkpoints

    g = gauge if isinstance(gauge, SignedPerm) else SignedPerm.load(gauge)
    return verify_checkpoints(a, b, g, n_tokens=n_tokens, tol=tol, dtype=dtype, seed=seed)


# ---------------------------------------------------------------------------- algebra
@dataclass
class GaugeDocument:
    """A gauge and what its file records."""

    gauge: SignedPerm
    metadata: dict[str, Any]

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        self.gauge.save(path, self.metadata, overwrite=overwrite)
        return Path(path)


def compose(gauges: Sequence[str | Path], *, force: bool = False) -> GaugeDocument:
    """G1, then G2, ... (``gaugefix compose``): refused where the recorded charts do not
    chain, unless ``force``."""
    from .estimate import compose_documents

    return GaugeDocument(*compose_documents(gauges, force=force))


def invert(gauge: str | Path) -> GaugeDocument:
    """The gauge B → A of a gauge file A → B, its recorded charts exchanged."""
    from .group import read_gauge_document

    doc = read_gauge_document(gauge)
    meta: dict[str, Any] = {"method": "invert", "inverted_from": str(gauge)}
    if "source" in doc and "target" in doc:
        meta.update(source=doc["target"], target=doc["source"])
    return GaugeDocument(SignedPerm.from_json(doc, str(gauge)).inverse(), meta)


def compare(estimate: SignedPerm | str | Path, reference: SignedPerm | str | Path
            ) -> dict[str, float]:
    """Permutation, sign and full accuracy of an estimate against a reference."""
    e, r = (g if isinstance(g, SignedPerm) else SignedPerm.load(g) for g in (estimate,
                                                                            reference))
    return e.compare(r)


# ---------------------------------------------------------------------------- identity
def canonicalize(model: ModelLike, output: str | Path, *, discrete_only: bool = False,
                 overwrite: bool = False, progress: bool = False) -> CanonicalChart:
    """Write ``model`` in its canonical chart (``gaugefix canonicalize``)."""
    from .canonical import canonicalize as run

    return run(model, output, overwrite=overwrite, progress=progress,
               discrete_only=discrete_only)


def fingerprint(model: ModelLike, *, discrete_only: bool = False,
                record: str | Path | None = None, overwrite: bool = False) -> Fingerprint:
    """A gauge-invariant identifier (``gaugefix fingerprint``); with ``record``, also write
    the fingerprint record that ``identify --against`` reads."""
    from .canonical import fingerprint as run
    from .canonical import write_record

    if record is not None:
        return write_record(model, record, discrete_only=discrete_only, overwrite=overwrite)
    return run(model, discrete_only=discrete_only)


def identify(a: ModelLike, b: ModelLike, *, alpha: float | None = None) -> Identity:
    """Same function up to gauge, derived, or unrelated (``gaugefix identify``); ``alpha``:
    the held-out test's level (None: :data:`gaugefix.relation.DEFAULT_ALPHA`)."""
    from .canonical import identify as run
    from .relation import DEFAULT_ALPHA

    return run(a, b, alpha=DEFAULT_ALPHA if alpha is None else alpha)


def identify_against(suspect: ModelLike, folder: str | Path, *, alpha: float | None = None
                     ) -> list[AgainstOne]:
    """The suspect against a folder of fingerprint records (``gaugefix identify SUSPECT
    --against DIR``), most related first."""
    from .canonical import identify_against as run
    from .relation import DEFAULT_ALPHA

    return run(suspect, folder, alpha=DEFAULT_ALPHA if alpha is None else alpha)


# ---------------------------------------------------------------------------- transport
def transport(kind: str, source: str | Path, output: str | Path,
              gauge: SignedPerm | str | Path | Sequence[SignedPerm | str | Path | None], *,
              inverse: bool = False, checkpoint: ModelLike | None = None,
              overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Move a coordinate-indexed object into the other chart, in its own format
    (``gaugefix transport``). ``gauge``: a gauge or gauge file, or one per slot (None:
    unchanged) for the kinds that read several streams; ``checkpoint``: the checkpoint the
    moved object belongs to, recorded by its gauge-invariant fingerprint. Returns what the
    adapter reports."""
    from .transport import transport as run

    single = isinstance(gauge, SignedPerm | str | Path)
    items = [gauge] if single else list(gauge)  # type: ignore[arg-type]
    names = ", ".join("-" if g is None else "gauge" if isinstance(g, SignedPerm) else str(g)
                      for g in items)
    loaded = [g if g is None or isinstance(g, SignedPerm) else SignedPerm.load(g)
              for g in items]
    g: Any = loaded[0] if single or (len(loaded) == 1 and loaded[0] is not None) else loaded
    if checkpoint is not None:
        from .canonical import fingerprint as fp

        m = open_model(checkpoint)
        width = g.d if isinstance(g, SignedPerm) else next(
            (s.d for s in loaded if s is not None), None)
        if width is not None and width != m.hidden_size:
            raise GaugefixError(f"--checkpoint {m.name} has d={m.hidden_size}, the gauge "
                                f"d={width}: the object cannot belong to it")
        options["checkpoint"] = {"name": m.name,
                                 "fingerprint": fp(m, discrete_only=True).fingerprint}
    return run(kind, source, output, g, inverse=inverse, overwrite=overwrite,
               gauge_file=names, **options)


# ---------------------------------------------------------------------------- merge
def merge(a: ModelLike, b: ModelLike, output: str | Path,
          gauge: SignedPerm | str | Path | None = None, *, method: str = "linear",
          weight: float = 0.5, base: ModelLike | None = None,
          export_aligned: str | Path | None = None, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Coordinate-preserving merge (``gaugefix merge``): B moved into A's chart by the
    gauge's inverse, then merged; ``gauge=None`` merges unaligned (a baseline)."""
    from .transport import merge_checkpoints

    g = gauge if gauge is None or isinstance(gauge, SignedPerm) else SignedPerm.load(gauge)
    return merge_checkpoints(a, b, g, output, method=method, weight=weight, base=base,
                             export_aligned=export_aligned, overwrite=overwrite,
                             progress=progress)


def __getattr__(name: str) -> Any:  # the options class, without importing torch up front
    if name == "StatsOptions":
        from .estimate import StatsOptions

        return StatsOptions
    raise AttributeError(name)


__all__ = [
    "ApplyResult",
    "AuditResult",
    "GaugeDocument",
    "GaugeEstimate",
    "StatsOptions",
    "TrajectoryEstimate",
    "apply",
    "audit",
    "canonicalize",
    "collect_stats",
    "compare",
    "compose",
    "fingerprint",
    "identify",
    "inspect",
    "invert",
    "match",
    "merge",
    "stats_options",
    "trajectory",
    "transport",
]
