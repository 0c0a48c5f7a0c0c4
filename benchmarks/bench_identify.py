"""`gaugefix identify` on pairs whose relation is known (issue 11): same, derived, unrelated.

From the cached lineages of bench_lineages.py (Llama, Qwen3, GPT-NeoX; the demo grammar and
random Markov languages; seeds 0-2; fine-tuning lr 5e-3, 2e-2, 6e-2; every checkpoint in its
own random gauge):

* same — a base and a copy re-gauged by `apply --random`;
* derived — a base and each run's last checkpoint, and the two runs' last checkpoints (a
  re-gauged fine-tune: every checkpoint is in its own gauge);
* unrelated — bases of the same family and shape trained from other initialisations.

Prints, per true relation, the verdicts at the default α (derived when the held-out alignment
test's p-value is at most α, see gaugefix.relation), the p-values (log10: their range and
median), the held-out mean cosine and the old rule's median relative distance after alignment;
beside it, a HuRef-style invariant (Zeng et al., NeurIPS 2024): per layer, the token-by-token
product E·diag(g)·Wᵀ·W·diag(g)·Eᵀ of the embedding rows of a fixed token subset, the layer's
input-norm gains and its attention input weights, which no residual rotation (so no gauge)
changes; two models are compared by the cosine similarity of these products. It gives a
similarity, never a witness; gaugefix's verdict comes with the gauge and a bit-exact check.

    python benchmarks/bench_identify.py [--cache DIR] [--json out.json]
        [--families llama,...] [--corpora grammar,...] [--seeds 0,1,...]

(every lineage is trained once and cached; the whole grid trains 54 of them.)

**Real-model tier** (``--real DIR``): real pretrained weights, offline — SmolLM2-135M and
Gemma 3 270M from the registry's GGUF packages — and a zoo of their derivatives made here
(``identity_zoo.py``: re-gauged, requantised to other GGUF types, briefly fine-tuned at three
learning rates, residual coordinates removed, vocabulary cut / extended / reordered, layers
dropped / repeated, a combination) against unrelated models (independent initialisations of
each config, narrower and shallower ones, the other family). Every pair gets gaugefix's
verdict at the default α with its p-value and what it found, and AWM's (``awm.py``, arXiv
2510.06738, reimplemented) on the same pair, each timed; then every zoo model's fingerprint
record is written and each model is tested ``--against`` the folder of records (seconds per
reference).

    python benchmarks/bench_identify.py --real /work/zoo-cache [--json real.json]

**Independently-trained tier** (``--independent DIR``, issue 33): small Llama models trained
from scratch here on CPython's documentation with different seeds (``independent_zoo.py``:
widths 64–256, 2 and 4 layers, 400 and 1,200 steps, a shared or another tokenizer, the same or
different halves of the text) — pairs that are *not* derived but learned the same data — and
derived pairs from one of them (re-gauged, fine-tuned at three learning rates, pruned, a layer
dropped): verdict, z, p, held-out cosine, fold-gauge agreement and per tensor group, AWM beside.

    python benchmarks/bench_identify.py --independent /work/indep-cache [--json indep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_lineages import CORPORA, FAMILIES, LRS, SEEDS, Case
from gaugefix.apply import gauge_checkpoint
from gaugefix.canonical import identify
from gaugefix.demo.lineage import build_lineage
from gaugefix.group import SignedPerm
from gaugefix.relation import DEFAULT_ALPHA

TOKENS = 64  # the token subset of the HuRef-style invariant


def huref_signature(path: Path) -> np.ndarray:
    """Per layer, E_S·diag(g)·Wᵀ·W·diag(g)·E_Sᵀ (E_S: embedding rows of the first TOKENS
    tokens; g: the layer's input-norm gain; W: its attention input weights), flattened."""
    import torch

    from gaugefix.checkpoint import Checkpoint
    from gaugefix.model import open_model

    ck = Checkpoint.open(path)
    sd = ck.tensors()
    m = open_model(path)
    n_layers = m.n_layers
    m.close()
    emb = next(v for k, v in sd.items() if "embed" in k).double()[:TOKENS]
    out = []
    for layer in range(n_layers):
        tag = f"layers.{layer}."
        gain = next(v for k, v in sd.items() if tag in k and "input_layernorm.weight" in k)
        readers = [v for k, v in sorted(sd.items()) if tag in k and k.endswith("weight")
                   and any(s in k for s in ("q_proj", "k_proj", "v_proj", "query_key_value"))]
        w = torch.cat([r.double() for r in readers], 0)
        x = (emb * gain.double()) @ w.T
        out.append((x @ x.T).flatten())
    return torch.cat(out).numpy()


def huref_similarity(a: Path, b: Path) -> float:
    x, y = huref_signature(a), huref_signature(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _stats(r) -> dict:
    """What a row keeps of a verdict's evidence (a same pair has no p-value: it is exact)."""
    e = r.evidence
    return {"p_value": e.get("p_value"), "log10_p": e.get("log10_p_value"),
            "z": e.get("z"), "cosine": e.get("held_out_mean_cosine"),
            "confidence": e.get("median_alignment_confidence"),
            "distance": e.get("median_relative_distance", 0.0)}


def real_tier(root: Path, out_json: Path | None) -> None:
    """The real-model tier (see the module docstring)."""
    from awm import awm_score
    from gaugefix import jobs
    from identity_zoo import pairs

    rows = []
    print(f"{'pair':28s} {'truth':9s} {'gaugefix':9s} {'log10 p':>9s} {'s':>6s}   "
          f"{'AWM':>7s} {'AWM says':9s} {'s':>6s}   found")
    zoo = pairs(root)
    for pair in zoo:
        t = time.perf_counter()
        r = jobs.identify(pair.a, pair.b)
        seconds = time.perf_counter() - t
        awm = awm_score(pair.a, pair.b)
        related = r.verdict in ("same", "derived")
        found = r.reason.split(":")[0] if r.verdict != "unrelated" else ""
        lp = r.evidence.get("log10_p_value")
        rows.append({"pair": pair.name, "what": pair.what, "related": pair.related,
                     "verdict": r.verdict, "reason": r.reason, "log10_p": lp,
                     "seconds": seconds, "awm": awm, "correct": related == pair.related})
        print(f"{pair.name:28s} {'related' if pair.related else 'unrelated':9s} "
              f"{r.verdict:9s} {'' if lp is None else f'{lp:9.1f}':>9s} {seconds:6.1f}   "
              f"{awm['score']:7.3f} {awm['decision']:9s} {awm['seconds']:6.1f}   "
              f"{found[:60]}", flush=True)
    ok = sum(r["correct"] for r in rows)
    awm_ok = sum((r["awm"]["decision"] == "related") == r["related"] for r in rows)
    print(f"\ngaugefix: {ok} of {len(rows)} pairs called right at α = {DEFAULT_ALPHA:g}; "
          f"AWM: {awm_ok} of {len(rows)} by its own rule")
    related_lp = [r["log10_p"] for r in rows if r["related"] and r["log10_p"] is not None]
    unrelated_lp = [r["log10_p"] for r in rows if not r["related"] and r["log10_p"] is not None]
    if related_lp and unrelated_lp:
        print(f"log10 p: related {min(related_lp):.0f}…{max(related_lp):.1f}, unrelated "
              f"{min(unrelated_lp):.2f}…{max(unrelated_lp):.2f}")
    models = {p.name.split(".")[0]: p for pair in zoo for p in (pair.a, pair.b)}
    against = against_timing(root, models)
    print(f"--against: {against['references']} records ({against['record_mb']:.1f} MB each on "
          f"average); {against['seconds_per_reference']:.2f} s per reference "
          f"(suspect sketched and fingerprinted once: {against['suspect_seconds']:.1f} s)")
    if out_json:
        out_json.write_text(json.dumps({"pairs": rows, "against": against}, indent=1,
                                       default=str))


def independent_tier(root: Path, out_json: Path | None) -> None:
    """Independently trained pairs and derived pairs from the same models (issue 33,
    ``independent_zoo.py``): every pair's verdict, z, p, held-out cosine, the fraction of
    coordinates the two folds' gauges map alike, and per tensor group; AWM beside it."""
    from awm import awm_score
    from gaugefix import jobs
    from independent_zoo import pairs

    rows = []
    print(f"{'pair':58s} {'truth':9s} {'verdict':9s} {'z':>7s} {'log10 p':>8s} {'cos':>7s} "
          f"{'folds':>6s} {'AWM':>6s}  strongest group")
    for pair in pairs(root):
        r = jobs.identify(pair.a, pair.b)
        ev = r.evidence
        try:
            awm = awm_score(pair.a, pair.b)
        except Exception as e:
            awm = {"score": float("nan"), "decision": f"n/a ({type(e).__name__})"}
        groups = ev.get("groups") or {}
        top = max(groups.items(), key=lambda kv: kv[1]["z"], default=(None, None))
        rows.append({"pair": pair.name, "what": pair.what, "related": pair.related,
                     "verdict": r.verdict, "reason": r.reason,
                     **{k: ev.get(k) for k in ("z", "log10_p_value", "held_out_mean_cosine",
                                               "fold_gauges_agree", "tensors_tested")},
                     "groups": groups, "awm": awm})
        z, lp, cos, agree = (ev.get(k) for k in ("z", "log10_p_value", "held_out_mean_cosine",
                                                  "fold_gauges_agree"))

        def num(x: Any, spec: str) -> str:
            return "—" if x is None else format(x, spec)

        print(f"{pair.name[:58]:58s} {'related' if pair.related else 'unrelated':9s} "
              f"{r.verdict:9s} {num(z, '7.2f')} {num(lp, '8.2f')} {num(cos, '7.4f')} "
              f"{num(agree, '6.3f')} {awm['score']:6.3f}  "
              + ("" if top[0] is None else f"{top[0].split('.')[-2]} z {top[1]['z']:.1f} "
                 f"cos {top[1]['mean_cosine']:.3f}"), flush=True)
    indep = [r for r in rows if not r["related"]]
    derived = [r for r in rows if r["related"]]
    fp = sum(r["verdict"] != "unrelated" for r in indep)
    tp = sum(r["verdict"] != "unrelated" for r in derived)
    print(f"\nindependently trained pairs called related: {fp} of {len(indep)}; derived pairs "
          f"detected: {tp} of {len(derived)}")
    zs = [r["z"] for r in indep if r["z"] is not None]
    if zs:
        print(f"independent pairs' z: mean {np.mean(zs):.2f}, range {min(zs):.2f} … "
              f"{max(zs):.2f}")
    if out_json:
        out_json.write_text(json.dumps({"pairs": rows}, indent=1, default=str))


# the suspects tested against the folder of every zoo model's record
SUSPECTS = ("combo", "regauged", "ft-lr1e-3", "reinit-s0", "gemma3-regauged")


def against_timing(root: Path, zoo: dict[str, Path]) -> dict:
    """A fingerprint record of every zoo model, then each model against the folder."""
    from gaugefix import jobs

    records = root / "fingerprint-records"
    records.mkdir(exist_ok=True)
    for name, path in zoo.items():
        rec = records / f"{name}.safetensors"
        if not rec.exists():
            jobs.fingerprint(path, discrete_only=True, record=rec)
    sizes = [f.stat().st_size for f in records.glob("*.safetensors")]
    per_ref, suspect, verdicts = [], [], {}
    for name, path in zoo.items():
        if name not in SUSPECTS:
            continue
        t = time.perf_counter()
        res = jobs.identify_against(path, records)
        total = time.perf_counter() - t
        tests = sum(r.seconds for r in res)
        per_ref.append(tests / len(res))
        suspect.append(total - tests)
        verdicts[name] = {Path(r.path).stem: r.identity.verdict for r in res}
    return {"references": len(sizes), "record_mb": float(np.mean(sizes)) / 1e6,
            "seconds_per_reference": float(np.mean(per_ref)),
            "suspect_seconds": float(np.mean(suspect)), "verdicts": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", type=Path, default=None,
                    help="run the real-model tier, its zoo built (once) in this folder")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gaugefix" /
                    "bench-lineages")
    ap.add_argument("--independent", type=Path, default=None,
                    help="run the independently-trained tier, its models trained (once) in "
                    "this folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = ap.parse_args()
    if args.real is not None:
        real_tier(args.real, args.json)
        return
    if args.independent is not None:
        independent_tier(args.independent, args.json)
        return
    families, corpora = args.families.split(","), args.corpora.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = []
    tmp = Path(tempfile.mkdtemp())
    bases: dict[tuple[str, str], list[Path]] = {}
    for fam, corpus in itertools.product(families, corpora):
        for seed in seeds:
            for lr in LRS:
                case = Case(fam, corpus, seed, lr)
                lin = build_lineage(args.cache / corpus, case.spec(False), case.corpus_obj())
                pairs = [("derived", lin.base, lin.run_a[-1]), ("derived", lin.base, lin.run_b[-1]),
                         ("derived", lin.run_a[-1], lin.run_b[-1])]
                if lr == LRS[0]:
                    bases.setdefault((fam, corpus), []).append(lin.base)
                    copy = tmp / f"{fam}-{corpus}-{seed}-copy"
                    kind = "signed" if "neox" not in fam else "global"
                    gauge_checkpoint(lin.base, copy, SignedPerm.random(64, seed=seed + 7,
                                     kind=kind), progress=False)
                    pairs.append(("same", lin.base, copy))
                for truth, a, b in pairs:
                    t = time.perf_counter()
                    r = identify(a, b)
                    t1 = time.perf_counter()
                    huref = huref_similarity(a, b)
                    rows.append({"family": fam, "corpus": corpus, "seed": seed, "lr": lr,
                                 "truth": truth, "verdict": r.verdict, **_stats(r),
                                 "seconds": t1 - t, "huref": huref,
                                 "huref_seconds": time.perf_counter() - t1})
        for a, b in itertools.combinations(bases[(fam, corpus)], 2):
            r = identify(a, b)
            rows.append({"family": fam, "corpus": corpus, "truth": "unrelated",
                         "verdict": r.verdict, "huref": huref_similarity(a, b), **_stats(r)})
        print(fam, corpus, "done", flush=True)
    print(f"\nrule: derived if the held-out test's p-value ≤ α = {DEFAULT_ALPHA:g}")
    for truth, lr in (("same", None), *(("derived", lr) for lr in LRS), ("unrelated", None)):
        sel = [r for r in rows if r["truth"] == truth and (lr is None or r.get("lr") == lr)]
        if not sel:
            continue
        verdicts = {v: sum(r["verdict"] == v for r in sel) for v in ("same", "derived",
                                                                     "unrelated")}
        label = truth if lr is None else f"{truth} lr {lr:g}"
        print(f"  {label:18s} n={len(sel):3d} verdicts {verdicts}")
        if truth == "same":
            continue
        lp = [r["log10_p"] for r in sel]
        cos = [r["cosine"] for r in sel]
        d = [r["distance"] for r in sel]
        print(f"    log10 p {np.min(lp):.1f}–{np.max(lp):.1f} (median {np.median(lp):.1f}); "
              f"held-out cosine {np.min(cos):.3f}–{np.max(cos):.3f}; relative distance "
              f"{np.min(d):.3f}–{np.max(d):.3f}")
    t = [r["seconds"] for r in rows if "seconds" in r]
    th = [r["huref_seconds"] for r in rows if "huref_seconds" in r]
    print(f"  time per pair: identify {np.mean(t):.3f} s mean, HuRef-style {np.mean(th):.3f} s")
    print("\nHuRef-style cosine similarity per true relation:")
    for truth, lr in (("same", None), *(("derived", lr) for lr in LRS), ("unrelated", None)):
        if not any(r["truth"] == truth for r in rows):
            continue
        h = [r["huref"] for r in rows if r["truth"] == truth and (lr is None or r["lr"] == lr)]
        label = truth if lr is None else f"{truth} lr {lr:g}"
        print(f"  {label:18s} {np.min(h):.3f}–{np.max(h):.3f} (median {np.median(h):.3f})")
    unrelated_max = max(r["huref"] for r in rows if r["truth"] == "unrelated")
    for lr in LRS:
        sel = [r for r in rows if r["truth"] == "derived" and r["lr"] == lr]
        print(f"  derived at lr {lr:g} above every unrelated pair's similarity "
              f"({unrelated_max:.3f}): {sum(r['huref'] > unrelated_max for r in sel)} of "
              f"{len(sel)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
