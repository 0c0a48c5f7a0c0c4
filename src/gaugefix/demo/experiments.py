"""The demo's experiments. Each returns plain data (for results.json and the report).

Estimators see only checkpoints and tokens; the planted gauges of a lineage are
used for scoring alone.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..apply import gauge_model
from ..arch import detect_family
from ..audit import Claim, audit_models, derive_claim
from ..estimate import (
    StatsOptions,
    compose_gauges,
    estimate_gauge,
    match_weights,
    source_stats,
)
from ..group import SignedPerm
from ..model import Model, open_model
from ..stats import CrossStats, ResidualTap, residuals
from ..testing import (
    corpus_model,
    eval_loss,
    force_gauge,
    function_error,
    gauge_deviation,
    make_optimizer,
    nmse,
    random_orthogonal,
    rotate_dense,
    sae_reconstruct,
    train,
    train_on_batches,
    train_sae,
)
from ..tiny import TINY_SPECS
from ..transport import merge_checkpoints
from ..transport.base import transport_tensors
from ..transport.optim import transport_state_dict
from ..transport.sae import SAELENS_RULES
from .corpus import Corpus
from .english import Concept
from .lineage import Lineage
from .steer import contrast_direction, steering_effect

METHODS = ("signmarg", "signed", "perm")


# ---------------------------------------------------------------------------- 1. groups
def gauge_groups(corpus: Corpus, families: list[str], train_steps: int, seed: int,
                 cache: Path | None = None) -> list[dict[str, Any]]:
    """Function error under three candidate symmetries, at init and after training. The
    trained models are saved under ``cache/groups`` and reused by a later run."""
    rows = []
    ids = torch.from_numpy(corpus.stream(512, seed + 5)).view(4, 128)
    for fam_name in families:
        model = corpus_model(fam_name, corpus.vocab_size, hidden_size=64, seed=seed)
        d = model.config.hidden_size
        for stage in ("init", "trained"):
            if stage == "trained":
                model = _trained(model, corpus, train_steps, seed, None if cache is None else
                                 cache / "groups" / f"{fam_name}-d{d}-t{train_steps}-s{seed}")
            signed = SignedPerm.random(d, seed + 1, positive_fraction=0.5)
            glob = SignedPerm(signed.perm, -np.ones(d, dtype=np.int64))
            q = random_orthogonal(d, seed + 2)
            rows.append({
                "family": fam_name, "stage": stage,
                "group": detect_family(model.config).gauge_group,
                "signed_perm": function_error(model, force_gauge(model, signed), ids),
                "perm_global_sign": function_error(model, force_gauge(model, glob), ids),
                "orthogonal": function_error(model, rotate_dense(model, q), ids),
            })
    return rows


def _trained(model: torch.nn.Module, corpus: Corpus, steps: int, seed: int,
             where: Path | None) -> torch.nn.Module:
    """``model`` trained on the corpus, or the copy a previous run saved at ``where`` (saved
    whole or not at all: written beside it, then renamed)."""
    if where is not None and (where / "config.json").exists():
        return type(model).from_pretrained(where, dtype=torch.float32).eval()
    train(model, corpus.stream(50_000, seed), steps=steps, lr=3e-3, seed=seed)
    if where is not None:
        import shutil

        tmp = where.with_name(where.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tmp.rename(where)
    return model


# ---------------------------------------------------------------------------- 2. ceiling
def ceiling(model: torch.nn.Module, probe: np.ndarray, fractions: list[float], seed: int,
            device: str = "cpu") -> list[dict[str, Any]]:
    """Permutation accuracy of each method against the positive-sign fraction of a planted
    gauge (exact: B = Q·A)."""
    from ..estimate import activation_stats, match_stats

    fam = detect_family(model.config)
    rows = []
    for n, p in enumerate(fractions):
        g = SignedPerm.random(model.config.hidden_size, seed + n, positive_fraction=p)
        b = gauge_model(model, g)
        st = activation_stats(model, b, StatsOptions(tokens=probe, n_tokens=len(probe),
                                                     device=device))
        row: dict[str, Any] = {"positive_fraction": p}
        for m in METHODS:
            acc = match_stats(st, fam, m).gauge.compare(g)
            row[m] = {"perm_accuracy": acc["perm_accuracy"], "full_accuracy":
                      acc["full_accuracy"]}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- 3. trajectories
class Matcher:
    """Matches between saved checkpoints (activations on one probe stream), cached."""

    def __init__(self, lineage: Lineage, probe: np.ndarray, device: str = "cpu") -> None:
        self.lin = lineage
        self.device = device
        self.opts = StatsOptions(tokens=probe, n_tokens=len(probe), device=device)
        self.models: dict[Path, Model] = {}  # each opened once, its module loaded once
        self.cache: dict[tuple[Path, Path, str, str], Any] = {}
        # a pair's statistics, shared by every method (pooled ones apart): the last step
        # matches each pair with every method, from one forward pass of each model
        self.stats: dict[tuple[Path, Path, bool], CrossStats] = {}

    def model(self, path: Path) -> torch.nn.Module:
        return self.opened(path).load(device=self.device)

    def opened(self, path: Path) -> Model:
        if path not in self.models:
            self.models[path] = open_model(path)
        return self.models[path]

    def match(self, a: Path, b: Path, method: str = "signmarg", source: str = "both") -> Any:
        key = (a, b, method, source)
        if key not in self.cache:
            stats = None
            if source != "weights":
                pair = (a, b, source == "pooled")
                if pair not in self.stats:
                    self.stats[pair] = source_stats(self.opened(a), self.opened(b), source,
                                                    self.opts)
                stats = self.stats[pair]
            self.cache[key] = estimate_gauge(self.opened(a), self.opened(b), method=method,
                                             source=source, opts=self.opts, stats=stats)
        return self.cache[key]

    def chain(self, path: list[Path], method: str = "signmarg", source: str = "both"
              ) -> SignedPerm:
        return compose_gauges([self.match(x, y, method, source).gauge
                               for x, y in itertools.pairwise(path)])


def trajectories(lin: Lineage, matcher: Matcher, *, last_only: bool = False,
                 pooled: bool = True) -> dict[str, Any]:
    """Cross-run recovery (A_k's chart → B_k's) by endpoint, via the base, and composed, with
    gaugefix's default evidence; at the last step also with the seed paper's estimator
    (``pooled``: co-moments pooled over positions; ``pooled=False`` leaves it out, for models
    whose forward passes are dear). ``last_only``: the last step with signmarg alone (what the
    summary reports)."""
    curve = []
    for k, step in enumerate(lin.steps, start=1):
        last = k == len(lin.steps)
        if last_only and not last:
            continue
        a_k, b_k = lin.run_a[k - 1], lin.run_b[k - 1]
        truth = lin.true_gauge(a_k, b_k)
        row: dict[str, Any] = {"step": step}
        runs = [(m, m, "both") for m in (METHODS if last and not last_only else ("signmarg",))]
        if last and pooled:
            runs.append(("pooled", "signmarg", "pooled"))
        for name, method, source in runs:
            endpoint = matcher.match(a_k, b_k, method, source).gauge
            via = matcher.chain([a_k, lin.base, b_k], method, source)
            composed = matcher.chain([*lin.run_a[:k][::-1], lin.base, *lin.run_b[:k]], method,
                                     source)
            row[name] = {key: g.compare(truth)["full_accuracy"] for key, g in
                         (("endpoint", endpoint), ("via_base", via), ("composed", composed))}
        curve.append(row)
    if last_only:
        return {"curve": curve}
    last_a, last_b = lin.run_a[-1], lin.run_b[-1]
    weights = match_weights(last_a, last_b).gauge.compare(lin.true_gauge(last_a, last_b))
    local = [matcher.match(x, y).summary()
             for x, y in itertools.pairwise([*lin.run_a[::-1], lin.base, *lin.run_b])]
    return {"curve": curve, "weights_endpoint_last": weights["full_accuracy"],
            "weakest_local_median_confidence": min(s["median_confidence"] for s in local)}


# ---------------------------------------------------------------------------- 4. SAE
@torch.no_grad()
def residual_acts(model: torch.nn.Module, ids: torch.Tensor, position: int,
                  batch_size: int = 16, skip: int = 0) -> torch.Tensor:
    """The residual at ``position`` (0 = embeddings, l = after layer l) for every token of the
    [n, L] windows ``ids`` but each window's first ``skip`` (a pretrained model parks massive
    activations on its first tokens, the attention sink: SAEs are trained without them), as
    [n·(L − skip), d] on the CPU (windows run ``batch_size`` at a time, on the model's
    device)."""
    device = next(model.parameters()).device
    d = model.config.hidden_size
    out = []
    with ResidualTap(model, detect_family(model.config), [position]) as tap:
        for chunk in ids.split(batch_size):
            acts = residuals(model, chunk.to(device), tap)[position].reshape(*chunk.shape, d)
            out.append(acts[:, skip:].reshape(-1, d).float().cpu())
    return torch.cat(out)


def _ordinary(*acts: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Tokens whose residual norm stays within ``factor`` × the median in every one of
    ``acts`` (None: all)."""
    keep = torch.ones(acts[0].shape[0], dtype=torch.bool)
    if factor is not None:
        for x in acts:
            n = x.norm(dim=1)
            keep &= n <= factor * n.median()
    return keep


def sae_between(model_a: torch.nn.Module, model_b: torch.nn.Module, gauge: SignedPerm,
                truth: SignedPerm | None, train_ids: torch.Tensor, eval_ids: torch.Tensor,
                position: int, seed: int, steps: int, skip: int = 0,
                massive: float | None = None) -> dict[str, float]:
    """An SAE (4·d latents) trained on A's residual at ``position`` over ``train_ids``, then its
    NMSE on ``eval_ids`` — on A, and on B moved by the estimated gauge (B_d), by its
    permutation alone (S_d, signs dropped), by the true gauge if known, and not moved.
    Explained variance is 1 − NMSE. ``skip``: leave out each window's first tokens;
    ``massive``: leave out tokens whose residual norm exceeds that many times the median (a
    pretrained model's massive activations: a handful of tokens with 100× the norm, which
    would otherwise be all an SAE learns), counted in the result."""
    xa = residual_acts(model_a, train_ids, position, skip=skip)
    keep = _ordinary(xa, factor=massive)
    sae = train_sae(xa[keep], 4 * xa.shape[1], steps=steps, seed=seed)
    ea = xa if eval_ids is train_ids else residual_acts(model_a, eval_ids, position, skip=skip)
    eb = residual_acts(model_b, eval_ids, position, skip=skip)
    keep_eval = _ordinary(ea, eb, factor=massive)
    ea, eb = ea[keep_eval], eb[keep_eval]

    def on_b(g: SignedPerm | None) -> float:
        moved = sae if g is None else transport_tensors(sae, SAELENS_RULES, g, "sae")
        return nmse(eb, sae_reconstruct(moved, eb))

    out = {"A_original": nmse(ea, sae_reconstruct(sae, ea)), "B_d_estimated": on_b(gauge),
           "S_d_estimated": on_b(gauge.unsigned())}
    if truth is not None:
        out["B_d_true"] = on_b(truth)
    out["untransported"] = on_b(None)
    if massive is not None:
        out["massive_tokens_left_out"] = int((~keep).sum() + (~keep_eval).sum())
    return out


def sae_transfer(model_a: torch.nn.Module, model_b: torch.nn.Module, gauge: SignedPerm,
                 truth: SignedPerm, corpus: Corpus, seed: int, steps: int) -> dict[str, float]:
    ids = torch.from_numpy(corpus.stream(8192, seed + 11)).view(-1, 128)
    return sae_between(model_a, model_b, gauge, truth, ids, ids, 1, seed, steps)


# ---------------------------------------------------------------------------- 5. steering
def steering_transfer(model_a: torch.nn.Module, model_b: torch.nn.Module, gauge: SignedPerm,
                      concepts: list[Concept], layer: int, scale: float) -> dict[str, Any]:
    """Each concept's contrast direction on A (times ``scale``) after decoder layer ``layer``:
    its effect on A, and the share of it kept on B when moved by the estimated gauge (B_d), by
    its permutation alone (S_d) and not moved. A negative share reverses the effect."""
    out: dict[str, Any] = {}
    for c in concepts:
        v = scale * contrast_direction(model_a, c.positive, c.negative, layer)
        e_a = steering_effect(model_a, c.tests, c.up, c.down, layer, v)
        row: dict[str, Any] = {"effect_on_A": e_a, "direction_norm": float(v.norm())}
        for name, g in (("B_d", gauge), ("S_d", gauge.unsigned())):
            row[f"{name}_percent"] = 100 * steering_effect(model_b, c.tests, c.up, c.down,
                                                           layer, g.apply(v)) / e_a
        row["untransported_percent"] = 100 * steering_effect(model_b, c.tests, c.up, c.down,
                                                             layer, v) / e_a
        out[c.name] = row
    return out


# ---------------------------------------------------------------------------- 6. merge
def merges(lin: Lineage, gauge: SignedPerm, corpus: Corpus, work: Path) -> dict[str, float]:
    a, b = lin.run_a[-1], lin.run_b[-1]
    work.mkdir(parents=True, exist_ok=True)
    tokens = corpus.stream(16384, 4242)
    out = {"A": eval_loss(lin.load(a), tokens), "B": eval_loss(lin.load(b), tokens)}
    for name, g in (("coordinate_preserving", gauge), ("permutation_only", gauge.unsigned()),
                    ("unaligned", None)):
        merge_checkpoints(a, b, g, work / f"merge-{name}", overwrite=True)
        out[name] = eval_loss(lin.load(work / f"merge-{name}"), tokens)
    return out


# ---------------------------------------------------------------------------- 7. optimizer
def optimizer_transport(model: torch.nn.Module, corpus: Corpus, seed: int,
                        steps: int) -> dict[str, Any]:
    """:func:`optimizer_resume` on the grammar: 10 warm steps of 8×32 tokens, then ``steps``."""
    batches = torch.from_numpy(corpus.stream((10 + steps) * 8 * 32, seed + 3)).view(-1, 8, 32)
    return optimizer_resume(model, batches, 10, seed, 3e-3)


def optimizer_resume(model: torch.nn.Module, batches: torch.Tensor, warm: int, seed: int,
                     lr: float, estimate: Any = None) -> dict[str, Any]:
    """Train A for ``warm`` batches, move model and AdamW state to chart B, continue in
    lockstep on the remaining batches: B with the state moved by the gauge (signed), B with
    the state moved by its permutation alone (signs dropped), and A itself (the reference);
    per step each one's loss and its deviation from Q·A (whole-model relative distance).

    ``estimate(A, B) -> SignedPerm``: the state is moved by the gauge estimated between the
    two charts' weights (what a user has), not by the planted one.

    The two charts sum in different orders, and Adam amplifies rounding on parameters with
    near-zero gradients, so even an exact transport drifts by this run's *rounding floor*,
    measured as the deviation between two correct transports into different charts (g and
    h). Signed state should sit at that floor; permutation-only state well above it."""
    model_a = copy.deepcopy(model)
    opt_a = make_optimizer(model_a, lr)
    train_on_batches(model_a, opt_a, batches[:warm])
    d = model.config.hidden_size
    g = SignedPerm.random(d, seed + 4, positive_fraction=0.5)
    h = SignedPerm.random(d, seed + 5, positive_fraction=0.5)
    fam = detect_family(model.config)
    names = [n for n, _ in model_a.named_parameters()]
    out: dict[str, Any] = {}
    if estimate is not None:
        est = estimate(model_a, gauge_model(model_a, g))
        out["estimated_gauge_accuracy"] = est.compare(g)["full_accuracy"]
        g_state = est
    else:
        g_state = g

    def moved(chart: SignedPerm, state_gauge: SignedPerm) -> tuple[torch.nn.Module, Any]:
        model_b = gauge_model(model_a, chart)
        opt_b = make_optimizer(model_b, lr)
        opt_b.load_state_dict(transport_state_dict(copy.deepcopy(opt_a.state_dict()), names,
                                                   fam, state_gauge))
        return model_b, opt_b

    runs = {"reference": moved(SignedPerm.identity(d), SignedPerm.identity(d)),
            "signed": moved(g, g_state), "permutation_only": moved(g, g_state.unsigned()),
            "second_chart": moved(h, h)}
    curve = []
    for k, ids in enumerate(batches[warm:], start=1):
        losses = {name: train_on_batches(m, o, ids[None])[0] for name, (m, o) in runs.items()}
        ref, in_g = runs["reference"][0], runs["signed"][0]
        curve.append({"step": k, "loss": losses,
                      "signed": gauge_deviation(in_g, ref, g),
                      "permutation_only": gauge_deviation(runs["permutation_only"][0], ref, g),
                      "rounding_floor": gauge_deviation(runs["second_chart"][0], in_g,
                                                        g.inverse().then(h))})
    last = curve[-1]
    return {**out, "signed": last["signed"], "permutation_only": last["permutation_only"],
            "rounding_floor": last["rounding_floor"], "steps": len(curve), "lr": lr,
            "curve": curve}


# ---------------------------------------------------------------------------- 8. audit
def audit_claim(lin: Lineage, matcher: Matcher, positive: list[Any], negative: list[Any],
                n_gauges: int, seed: int, layer: int | None = None) -> dict[str, Any]:
    """A top-8 claim derived on run A's last checkpoint from the contrast ``positive`` −
    ``negative`` (token-id prompts) at residual position ``layer`` (None: where the contrast
    is strongest), audited on A, the base and run B's last checkpoint under random gauges."""
    from ..audit import concept_direction

    src = lin.run_a[-1]
    # the claim is made where the model carries the contrast to the last token (a run may do
    # so only in its last layer; elsewhere the contrast can be rounding noise)
    model = matcher.model(src)
    if layer is None:
        layer = max(range(1, model.config.num_hidden_layers + 1), key=lambda p: float(
            concept_direction(model, Claim(p, [(0, 1)], positive, negative)).norm()))
    claim = derive_claim(model, layer=layer, k=8, positive=positive, negative=negative)
    targets = [(src, SignedPerm.identity(model.config.hidden_size)),
               (lin.base, matcher.chain([*lin.run_a[::-1], lin.base])),
               (lin.run_b[-1], matcher.chain([*lin.run_a[::-1], lin.base, *lin.run_b]))]
    rep = audit_models(claim, [(p.name, matcher.model(p), g) for p, g in targets],
                       n_gauges=n_gauges, seed=seed)
    rows = rep.to_dict()["rows"]
    same = [r for r in rows if r["model"] == src.name and r["gauge"].startswith("random B_d")]
    by_model = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        by_model[name] = {"raw": float(np.mean([r["raw"] for r in mine])),
                          "transported": float(np.mean([r["transported"] for r in mine]))}
    return {"claim": {"layer": layer, "k": 8, "coordinates": claim.coordinates}, "rows": rows,
            "summary": rep.summary(), "by_model": by_model,
            "same_model_random_B_d": {"raw": float(np.mean([r["raw"] for r in same])),
                                      "transported": float(np.mean([r["transported"]
                                                                    for r in same]))}}


def all_families() -> list[str]:
    return sorted(TINY_SPECS)
