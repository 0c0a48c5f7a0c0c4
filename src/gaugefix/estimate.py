"""High-level estimation: the gauge between two checkpoints, and along trajectories.

Every function takes models as :data:`gaugefix.model.ModelLike` (a checkpoint directory,
a hub id, a loaded module, or an opened :class:`gaugefix.model.Model`) and opens each
once, at its boundary. Two sources of evidence, and their combination:

* ``activations`` — cross-correlation of residual streams on shared tokens
  (:mod:`gaugefix.stats`), one matrix per residual position;
* ``weights`` — data-free: each residual coordinate's signature is its slice of
  every residual-touching tensor (embedding and lm_head columns over the shared
  vocabulary, reader columns, writer rows, LayerNorm biases) for the signed part,
  and its norm gains for the unsigned part;
* ``both`` (the default) — every position's correlations and the weight signatures,
  each weighed by how clearly it singles out partners (:func:`gaugefix.match.match_evidence`);
* ``pooled`` — the seed paper's estimator, kept to reproduce it: activation co-moments pooled
  over every position into one correlation matrix, matched as it is (confidence: a
  correlation margin).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import Family
from .errors import GaugefixError
from .group import SignedPerm
from .match import (
    METHODS,
    SOLVERS,
    Evidence,
    MatchResult,
    match_correlation,
    match_evidence,
)
from .model import Model, ModelLike, open_model, torch_dtype
from .model import check_pair as _check_models
from .stats import CrossStats, collect_stats, load_token_source, resolve_positions

MIN_TOKENS_PER_DIM = 2
SOURCES: tuple[str, ...] = ("both", "activations", "weights", "pooled")
DEFAULT_SOURCE = "both"
# per-position co-moments in memory (d×d float64 each): above this, evenly spaced positions
PER_POSITION_BYTES = 2 << 30


def check_pair(a: ModelLike, b: ModelLike) -> tuple[Family, int]:
    """Refuse two models of different families or widths; their family and width."""
    return _check_models(open_model(a), open_model(b))


def check_choices(method: str = "signmarg", source: str = DEFAULT_SOURCE,
                  solver: str = "lapjvs") -> None:
    """Refuse an unknown method, evidence source or solver before any work is done."""
    for what, value, allowed in (("method", method, METHODS), ("source", source, SOURCES),
                                 ("solver", solver, SOLVERS)):
        if value not in allowed:
            raise GaugefixError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


def min_tokens(d: int) -> int:
    return MIN_TOKENS_PER_DIM * d


def _check_tokens(n: int, d: int) -> None:
    if n < min_tokens(d):
        raise GaugefixError(
            f"too few tokens for the width: {n} tokens for d={d}; the correlation needs at "
            f"least {min_tokens(d)} ({MIN_TOKENS_PER_DIM}·d), and more gives sharper matches")


def check_device(device: str) -> None:
    """Refuse a device string torch cannot parse or a device this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GaugefixError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps"
                            ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GaugefixError(f"device {device!r}: this machine has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GaugefixError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GaugefixError(f"device {device!r}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise GaugefixError(f"device {device!r}: gaugefix runs on cpu, cuda or mps")


@dataclass
class StatsOptions:
    """How activation statistics are collected; checked once, when constructed."""

    tokens: str | Path | np.ndarray | None = None  # None: synthetic stream
    n_tokens: int = 16384
    seq_len: int = 128
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    positions: Sequence[int] | None = None
    per_position: bool = False
    seed: int = 0
    progress: bool = False
    max_memory: int | None = None  # bytes: run layer by layer within this budget
    device_map: str | None = None  # "auto": accelerate spreads each model over the devices

    def __post_init__(self) -> None:
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not isinstance(
                self.max_memory, int) or self.max_memory < 1):
            raise GaugefixError(f"max_memory must be a positive number of bytes, got "
                                f"{self.max_memory!r}")
        if self.max_memory is not None and self.device != "cpu":
            raise GaugefixError("a memory budget (--max-memory) runs on the CPU; on GPUs use "
                                "--device-map auto")
        if self.device_map not in (None, "auto"):
            raise GaugefixError(f"unknown device map {self.device_map!r}; the one choice is "
                                "'auto'")
        if self.device_map is not None and self.max_memory is not None:
            raise GaugefixError("give --max-memory or --device-map, not both")
        for name in ("n_tokens", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GaugefixError(f"{name} must be a positive integer, got {value!r}")
        if self.seed < 0:
            raise GaugefixError(f"seed must be ≥ 0, got {self.seed}")
        torch_dtype(self.dtype)  # an unknown name refused here
        check_device(self.device)

    def token_ids(self, vocab_size: int, model: Model, d: int) -> np.ndarray:
        _check_tokens(self.n_tokens, d)
        ids = load_token_source(self.tokens, vocab_size=vocab_size, n_tokens=self.n_tokens,
                                tokenizer_dir=model.tokenizer_dir, seed=self.seed)
        _check_tokens(len(ids), d)
        return ids


def activation_stats(a: ModelLike, b: ModelLike, opts: StatsOptions | None = None
                     ) -> CrossStats:
    """Cross-statistics of A's and B's residual streams on the options' tokens: both models
    in memory, or within ``opts.max_memory`` layer by layer (:mod:`gaugefix.layerwise`)."""
    opts = opts or StatsOptions()
    ma, mb = open_model(a), open_model(b)
    _, d = _check_models(ma, mb)
    for m in (ma, mb):  # everything refused before any model is loaded
        m.check()
        resolve_positions(opts.positions, m.n_layers)
        if m.max_positions is not None and opts.seq_len > m.max_positions:
            raise GaugefixError(f"--seq-len {opts.seq_len} is longer than {m.name} takes "
                                f"({m.max_positions} positions)")
    ids = opts.token_ids(min(ma.vocab_size, mb.vocab_size), ma, d)
    meta = {"model_a": ma.name, "model_b": mb.name, "n_tokens": len(ids),
            "seq_len": opts.seq_len}
    if opts.max_memory is not None:
        if ma.in_memory or mb.in_memory:
            raise GaugefixError("a memory budget needs checkpoints on disk, not loaded models")
        from .layerwise import collect_stats_layerwise

        return collect_stats_layerwise(
            ma, mb, ids, budget=opts.max_memory,
            positions=opts.positions, per_position=opts.per_position, seq_len=opts.seq_len,
            batch_size=opts.batch_size, dtype=torch_dtype(opts.dtype), meta=meta)
    return collect_stats(ma.load(opts.dtype, opts.device, opts.device_map),
                         mb.load(opts.dtype, opts.device, opts.device_map), ids,
                         positions=opts.positions, per_position=opts.per_position,
                         seq_len=opts.seq_len, batch_size=opts.batch_size, device=opts.device,
                         progress=opts.progress, meta=meta)


def evidence_positions(n_layers: int, d: int, budget: int = PER_POSITION_BYTES
                       ) -> list[int] | None:
    """Residual positions whose statistics are kept one by one: all of them (None), or, where
    their d×d co-moments would exceed ``budget``, as many as fit, evenly spaced and including
    the embeddings and the last layer."""
    n = n_layers + 1
    fit = max(2, budget // (d * d * 8))
    if n <= fit:
        return None
    return sorted({round(k * (n - 1) / (fit - 1)) for k in range(fit)})


def stats_evidence(stats: CrossStats) -> Evidence:
    """The activation evidence of saved or collected statistics: one correlation matrix per
    residual position where they were kept (``per_position``), else the pooled one."""
    stats.check_finite()
    _check_tokens(stats.n_tokens, stats.d)
    if stats.per_position:
        items = sorted(stats.per_position.items())
        return Evidence([m.correlation().numpy() for _, m in items],
                        [f"position {p}" for p, _ in items])
    return Evidence([stats.pooled.correlation().numpy()], ["pooled positions"])


def match_stats(stats: CrossStats, family: Family, method: str = "signmarg",
                solver: str = "lapjvs", weights: WeightEvidence | None = None) -> MatchResult:
    """The gauge from activation statistics (and weight signatures, if given), each block
    weighed by its reliability."""
    ev = stats_evidence(stats)
    if weights is not None:
        ev.blocks.append(weights.signed.numpy())
        ev.names.append("weights")
    return match_evidence(ev, method, global_sign_only=not family.allows_signs, solver=solver)


# ---------------------------------------------------------------------------- weights
DEFAULT_FEATURES = 8192


def _sample(shape: tuple[int, ...], axis: int, per_tensor: int | None,
            rng: np.random.Generator, blocks: int = 4) -> list[tuple[slice, ...]]:
    """Slices covering the residual axis whole and, on the other axes, ``blocks`` random
    contiguous runs of the last non-residual axis (all of it when ``per_tensor`` is None or
    the tensor is small). Contiguous runs read as few, long byte ranges."""
    full = tuple(slice(0, n) for n in shape)
    others = [i for i in range(len(shape)) if i != axis]
    if not others or per_tensor is None or math.prod(shape[i] for i in others) <= per_tensor:
        return [full]
    run_axis = others[-1]
    m = max(1, min(shape[run_axis], per_tensor // blocks))
    out = []
    for _ in range(blocks):
        idx = list(full)
        for i in others[:-1]:
            j = int(rng.integers(shape[i]))
            idx[i] = slice(j, j + 1)
        s0 = int(rng.integers(shape[run_axis] - m + 1))
        idx[run_axis] = slice(s0, s0 + m)
        out.append(tuple(idx))
    return out


@dataclass
class WeightEvidence:
    signed: torch.Tensor  # [d, d] cosine of signed signatures
    unsigned: torch.Tensor | None  # [d, d] cosine of centred gain fingerprints
    n_signed_blocks: int = 0
    n_gain_vectors: int = 0
    n_features: int = 0
    keys: list[str] = field(default_factory=list)


def weight_evidence(a: ModelLike, b: ModelLike, *, features: int | None = DEFAULT_FEATURES,
                    seed: int = 0) -> WeightEvidence:
    """Per-coordinate weight signatures of A and B, correlated.

    A coordinate's signed signature is its slice of every residual-touching tensor
    (embedding and head rows, reader columns, writer rows, LayerNorm biases), each tensor
    weighing the same; its unsigned one, the norm gains. ``features``: about that many
    signature entries in all, sampled as contiguous runs spread over every tensor and read
    lazily (only the sampled bytes), then one d×features product; None: every entry of every
    tensor, accumulated tensor by tensor (d×d products per tensor; slow at real widths).
    Non-residual axes are restricted to their shared extent (e.g. the shared vocabulary)."""
    sa, sb = open_model(a).check(), open_model(b).check()
    fam, d = _check_models(sa, sb)
    try:
        plan = sa.plan
        keys = [k for k in sorted(sa.shapes) if plan[k].one_stream]
        missing = [k for k in keys if k not in sb.shapes]
        if missing:
            raise GaugefixError(f"{sb.name} lacks {', '.join(missing[:5])}")
        signed_keys = [k for k in keys if plan[k].kind != "G"]
        per_tensor = None if features is None else max(1, features // max(1, len(signed_keys)))
        ev = WeightEvidence(torch.zeros(d, d, dtype=torch.float64), None)
        gains_a, gains_b, cols_a, cols_b = [], [], [], []
        for key in keys:
            op = plan[key]
            ra, rb = sa.shapes[key], sb.shapes[key]
            if len(ra) != len(rb):
                raise GaugefixError(f"{key}: shapes {list(ra)} and {list(rb)} differ in rank")
            shape = tuple(min(x, y) for x, y in zip(ra, rb, strict=True))
            if op.kind == "G":
                gains_a.append(sa.slice(key, (slice(0, d),)).double().reshape(-1) +
                               fam.gain_offset)
                gains_b.append(sb.slice(key, (slice(0, d),)).double().reshape(-1) +
                               fam.gain_offset)
                continue
            axis = op.residual_axis
            rng = np.random.default_rng([seed, *key.encode()])
            xa = torch.cat([torch.movedim(sa.slice(key, idx), axis, 0).reshape(d, -1).float()
                            for idx in _sample(shape, axis, per_tensor, rng)], 1)
            rng = np.random.default_rng([seed, *key.encode()])
            xb = torch.cat([torch.movedim(sb.slice(key, idx), axis, 0).reshape(d, -1).float()
                            for idx in _sample(shape, axis, per_tensor, rng)], 1)
            scale = float(xa.norm() * xb.norm())
            if scale == 0:
                continue
            w = math.sqrt(d / scale)  # every tensor weighs the same on average per coordinate
            xa, xb = xa * w, xb * w
            if features is None:  # accumulate: d×d per tensor, never all columns at once
                ev.signed += (xa @ xb.T).double()
                cols_a.append((xa * xa).sum(1).double())
                cols_b.append((xb * xb).sum(1).double())
            else:
                cols_a.append(xa)
                cols_b.append(xb)
            ev.n_signed_blocks += 1
            ev.n_features += xa.shape[1]
            ev.keys.append(key)
    finally:
        sa.close()
        sb.close()
    if ev.n_signed_blocks == 0:
        if not signed_keys:
            raise GaugefixError("no residual-axis tensors to build weight signatures from")
        raise GaugefixError(f"every residual tensor ({len(signed_keys)} read) is zero in "
                            f"{sa.name} or in {sb.name}: zero weights carry no signature, "
                            "so the data-free estimate has nothing to match (use "
                            "--source activations)")
    if features is None:
        na, nb = torch.stack(cols_a).sum(0), torch.stack(cols_b).sum(0)
        dot = ev.signed
    else:
        xa, xb = torch.cat(cols_a, 1), torch.cat(cols_b, 1)
        dot = (xa @ xb.T).double()
        na, nb = (xa * xa).sum(1).double(), (xb * xb).sum(1).double()
    denom = torch.outer(na.sqrt(), nb.sqrt())
    ev.signed = torch.where(denom > 0, dot / denom.clamp_min(1e-300), 0.0)
    if gains_a:
        ga, gb = torch.stack(gains_a, 1), torch.stack(gains_b, 1)
        ga, gb = ga - ga.mean(0), gb - gb.mean(0)
        ga = ga / ga.norm(dim=1, keepdim=True).clamp_min(1e-300)
        gb = gb / gb.norm(dim=1, keepdim=True).clamp_min(1e-300)
        ev.unsigned = ga @ gb.T
        ev.n_gain_vectors = len(gains_a)
    return ev


def match_weights(a: ModelLike, b: ModelLike, method: str = "signmarg", *,
                  gain_weight: float = 0.0, solver: str = "lapjvs",
                  features: int | None = DEFAULT_FEATURES) -> MatchResult:
    """Data-free gauge estimate from the checkpoints alone (no forward pass).

    ``gain_weight`` blends the unsigned gain-fingerprint similarity into the
    sign-blind score: ``(1 - w)|C| + w * C_gain``. ``features``: see
    :func:`weight_evidence`.
    """
    a, b = open_model(a), open_model(b)
    fam, _ = _check_models(a, b)
    ev = weight_evidence(a, b, features=features)
    if gain_weight > 0 and ev.unsigned is not None:  # confidence: a correlation margin
        magnitude = ((1 - gain_weight) * ev.signed.abs() + gain_weight * ev.unsigned).numpy()
        return match_correlation(ev.signed, method, global_sign_only=not fam.allows_signs,
                                 solver=solver, magnitude=magnitude)
    return match_evidence(Evidence([ev.signed.numpy()], ["weights"]), method,
                          global_sign_only=not fam.allows_signs, solver=solver)


# ---------------------------------------------------------------------------- one pair
def evidence_options(model: ModelLike, d: int, opts: StatsOptions | None) -> StatsOptions:
    """The statistics options an estimate needs: every residual position kept one by one (or
    as many as :data:`PER_POSITION_BYTES` holds, unless positions were chosen)."""
    opts = opts or StatsOptions()
    if opts.per_position:
        return opts
    positions = opts.positions
    if positions is None:
        positions = evidence_positions(open_model(model).n_layers, d)
    return dataclasses.replace(opts, per_position=True, positions=positions)


def source_stats(a: ModelLike, b: ModelLike, source: str, opts: StatsOptions | None
                 ) -> CrossStats:
    """The activation statistics ``source`` weighs: pooled ones for ``pooled``, every
    residual position's (up to the in-memory budget) for ``both`` and ``activations``."""
    a = open_model(a)
    return activation_stats(a, b, opts if source == "pooled" else
                            evidence_options(a, a.hidden_size, opts))


def estimate_gauge(a: ModelLike, b: ModelLike, *, source: str = DEFAULT_SOURCE,
                   method: str = "signmarg", opts: StatsOptions | None = None,
                   solver: str = "lapjvs", gain_weight: float = 0.0,
                   features: int | None = DEFAULT_FEATURES,
                   stats: CrossStats | None = None) -> MatchResult:
    """The gauge A → B from ``source``: ``both`` (activations at every residual position and
    weight signatures, weighed by reliability), ``activations``, ``weights`` or ``pooled``.
    ``stats``: saved statistics to use instead of a forward pass."""
    check_choices(method, source, solver)
    a, b = open_model(a), open_model(b)
    fam, d = _check_models(a, b)
    if source == "weights":
        if stats is not None:
            raise GaugefixError("saved statistics (--stats) are activation evidence: --stats "
                                "goes with --source both, activations or pooled")
        return match_weights(a, b, method, gain_weight=gain_weight, solver=solver,
                             features=features)
    if stats is None:
        stats = source_stats(a, b, source, opts)
    if stats.d != d:
        raise GaugefixError(f"width mismatch: statistics have d={stats.d}, the models d={d}")
    if source == "pooled":
        stats.check_finite()
        _check_tokens(stats.n_tokens, d)
        return match_correlation(stats.pooled.correlation(), method,
                                 global_sign_only=not fam.allows_signs, solver=solver)
    weights = weight_evidence(a, b, features=features) if source == "both" else None
    return match_stats(stats, fam, method, solver, weights)


# ---------------------------------------------------------------------------- trajectories
@dataclass
class TrajectoryResult:
    """The composed gauge, the local matches it was composed from (``steps``, along ``path``:
    indices into the checkpoints given, named ``names``), and every bridge tried around a
    weak step (``bridges``: (from, to) → flagged coordinates)."""

    gauge: SignedPerm
    steps: list[MatchResult]
    names: list[str]
    path: list[int] = field(default_factory=list)
    bridges: dict[tuple[int, int], int] = field(default_factory=dict)

    def step_table(self, threshold: float | None = None) -> list[dict[str, Any]]:
        return [
            {"from": self.names[k], "to": self.names[k + 1], **r.summary(threshold)}
            for k, r in enumerate(self.steps)
        ]

    def confidence(self) -> np.ndarray:
        """Per coordinate of the composed gauge (indexed by the last chart's coordinates): the
        lowest confidence of the local matches it was carried through."""
        conf = self.steps[-1].confidence.astype(np.float64)
        where = self.steps[-1].gauge.perm  # coordinate of the previous chart, per final one
        for r in reversed(self.steps[:-1]):
            conf = np.minimum(conf, r.confidence[where])
            where = r.gauge.perm[where]
        return conf

    @property
    def threshold(self) -> float:
        return self.steps[0].threshold

    @property
    def weakest_step(self) -> int:
        return int(np.argmin([r.summary()["median_confidence"] for r in self.steps]))


def _most_confident_path(n: int, matches: Mapping[tuple[int, int], MatchResult]) -> list[int]:
    """The path 0 → n-1 through the matched pairs (forward only) whose weakest step is the
    strongest: the largest lowest median confidence; among those, the one with the most
    (shorter) steps. (Counting flagged coordinates instead prefers one doubtful long jump to
    two sound steps that each flag a few.)"""
    best: dict[int, tuple[tuple[float, int], list[int]]] = {0: ((math.inf, 0), [0])}
    for j in range(1, n):
        for (i, k), r in matches.items():
            if k != j or i not in best:
                continue
            (weakest, steps), path = best[i]
            cand = ((min(weakest, float(np.median(r.confidence))), steps + 1), [*path, j])
            if j not in best or cand[0] > best[j][0]:
                best[j] = cand
    return best[n - 1][1]


def trajectory(ckpts: Sequence[ModelLike], *, source: str = DEFAULT_SOURCE,
               method: str = "signmarg", opts: StatsOptions | None = None,
               solver: str = "lapjvs", gain_weight: float = 0.0, bridge: bool = True,
               on_step: Callable[[int, MatchResult], None] | None = None) -> TrajectoryResult:
    """Match each consecutive pair and compose: the gauge from ckpts[0]'s chart to ckpts[-1]'s.

    ``bridge``: around a step with flagged coordinates, also match over it (i-1 → i+1,
    i → i+2, i-1 → i+2), then compose along the path through the fewest flagged matches.
    Two runs fine-tuned from one base: list run A backwards to the base, then run B
    forwards (``A_n ... A_1 base B_1 ... B_m``).
    """
    check_choices(method, source, solver)
    if len(ckpts) < 2:
        raise GaugefixError("a trajectory needs at least two checkpoints")
    models = [open_model(c) for c in ckpts]
    for a, b in itertools.pairwise(models):
        _check_models(a, b)
    opts = opts or StatsOptions()
    loaded: list[int] = []  # the few most recent modules stay loaded, each loaded once

    def keep(*idx: int) -> None:
        for i in idx:
            if i in loaded:
                loaded.remove(i)
            loaded.append(i)
        while len(loaded) > 4:
            models[loaded.pop(0)].unload()

    matches: dict[tuple[int, int], MatchResult] = {}

    def match(i: int, j: int) -> MatchResult:
        if (i, j) not in matches:
            keep(i, j)
            matches[(i, j)] = estimate_gauge(models[i], models[j], source=source,
                                             method=method, opts=opts, solver=solver,
                                             gain_weight=gain_weight)
        return matches[(i, j)]

    n = len(ckpts)
    for k in range(n - 1):
        r = match(k, k + 1)
        if on_step is not None:
            on_step(k, r)
    bridges: dict[tuple[int, int], int] = {}
    if bridge:
        weak = [k for k in range(n - 1) if matches[(k, k + 1)].low_confidence()]
        for k in weak:
            for i, j in ((k - 1, k + 1), (k, k + 2), (k - 1, k + 2)):
                if i >= 0 and j < n and (i, j) not in bridges:
                    bridges[(i, j)] = len(match(i, j).low_confidence())
    for m in models:
        m.unload()
    path = _most_confident_path(n, matches)
    steps = [matches[(i, j)] for i, j in itertools.pairwise(path)]
    return TrajectoryResult(compose_gauges([r.gauge for r in steps]), steps,
                            [models[i].name for i in path], path, bridges)


def compose_gauges(gauges: Sequence[SignedPerm]) -> SignedPerm:
    if not gauges:
        raise GaugefixError("nothing to compose")
    total = gauges[0]
    for g in gauges[1:]:
        total = total.then(g)
    return total


def compose_documents(paths: Sequence[str | Path], *, force: bool = False
                      ) -> tuple[SignedPerm, dict[str, Any]]:
    """Compose gauge files G1, G2, ... (G1 first). Where two consecutive files record their
    charts (``target`` of one, ``source`` of the next) and these differ, the gauges do not
    chain: an error, or with ``force`` a warning. Charts are compared by every content hash
    both files record (BLAKE3; sha256 in files of format 1), else by name, with a warning
    where each records a hash the other does not."""
    import warnings

    from .errors import GaugefixWarning
    from .gaugefile import hashes_of, same_chart
    from .group import read_gauge_document

    if not paths:
        raise GaugefixError("nothing to compose")
    docs = [read_gauge_document(p) for p in paths]
    for k in range(len(docs) - 1):
        target, source = docs[k].get("target"), docs[k + 1].get("source")
        same, by = same_chart(target, source)
        if by == "name" and hashes_of(target) and hashes_of(source):  # none in common
            warnings.warn(f"{paths[k]} records its target's {', '.join(hashes_of(target))}, "
                          f"{paths[k + 1]} its source's {', '.join(hashes_of(source))}: no "
                          "content hash in common, so the charts are compared by name only",
                          GaugefixWarning, stacklevel=2)
        if same is False:
            msg = (f"{paths[k]} maps into {target.get('name')!r} but {paths[k + 1]} starts "
                   f"from {source.get('name')!r} (compared by {by}): the gauges do not chain")
            if not force:
                raise GaugefixError(msg + " (pass --force to compose them anyway)")
            warnings.warn(msg, GaugefixWarning, stacklevel=2)
    total = compose_gauges([SignedPerm.from_json(d, str(p)) for d, p in zip(docs, paths,
                                                                           strict=True)])
    meta: dict[str, Any] = {"method": "compose", "composed_from": [str(p) for p in paths]}
    if "source" in docs[0]:
        meta["source"] = docs[0]["source"]
    if "target" in docs[-1]:
        meta["target"] = docs[-1]["target"]
    return total, meta


def gauge_metadata(result: MatchResult, a: ModelLike, b: ModelLike, *, source: str,
                   extra: Mapping[str, Any] | None = None, hash_weights: bool = True,
                   threshold: float | None = None) -> dict[str, Any]:
    """What a gauge file records of an estimate: both charts' identities (hashed once per
    model), the method, the evidence and every coordinate's confidence."""

    def ident(m: Model) -> dict[str, str]:
        return m.identity() if hash_weights else {"name": m.name}

    return {
        "source": ident(open_model(a)),
        "target": ident(open_model(b)),
        "method": result.method,
        "evidence": source,
        "confidence": [round(float(c), 6) for c in result.confidence],
        "summary": result.summary(threshold),
        **({"evidence_weights": result.weights} if result.weights else {}),
        **(extra or {}),
    }
