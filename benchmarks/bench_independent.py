"""Models trained independently on the same real text: what `identify` says of them (issue 29,
item 3; the null that issue 33 calibrates against).

Two small Llama models (``--hidden``, ``--layers``) are trained from scratch with different
seeds on the same real English (:func:`gaugefix.demo.realtext.python_docs`, the train split)
tokenised with SmolLM2-135M's tokenizer (its 49,152-token vocabulary), AdamW, ``--steps``
steps of ``--batch``×``--seq`` tokens. Reported per model: the loss curve (every 100 steps,
and held-out loss at the end) and outlier coordinates of the residual stream (per coordinate,
the mean |activation| at the last layer over held-out tokens, against the median coordinate:
how many exceed 10×). Then ``gaugefix identify`` on the pair: verdict, z, p and held-out mean
cosine, overall and per tensor group. There is no true gauge between independent runs: any
agreement past chance is convergent learning, not descent. Then what the demo's cross-run
machinery makes of the pair: the gauge estimated between them (gaugefix's default evidence
over held-out text) with its confidence, beside the same estimate between model 1 and an exact
re-gauging of it; and an SAE trained on model 1's middle residual, moved to model 2 by that
gauge, against not moved (NMSE on held-out text). Trained models are kept under ``--dir`` and
reused by a later run with the same settings.

    python benchmarks/bench_independent.py [--steps 800] [--hidden 128] [--layers 4]
                                           [--seeds 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_real import smollm2_checkpoint


def build(vocab: int, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    from gaugefix.tiny import build_tiny

    return build_tiny("llama", seed=seed, generic=False, vocab_size=vocab, hidden_size=hidden,
                      num_hidden_layers=layers, intermediate_size=4 * hidden,
                      num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                      max_position_embeddings=512)


@torch.no_grad()
def outliers(model: torch.nn.Module, held: np.ndarray, seq: int) -> dict[str, float]:
    model.eval()
    n = (len(held) // seq) * seq
    ids = torch.from_numpy(held[:n]).view(-1, seq)[:32]
    h = model(ids, output_hidden_states=True).hidden_states[-2]  # last layer, before the norm
    mean_abs = h.abs().mean(dim=(0, 1))
    med = float(mean_abs.median())
    return {"max_over_median": float(mean_abs.max()) / med,
            "coordinates_over_10x": int((mean_abs > 10 * med).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=str, default="1,2")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "gaugefix-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from gaugefix import jobs
    from gaugefix.demo.realtext import python_docs
    from gaugefix.testing import eval_loss, train

    args.dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint(args.dir))
    train_text, held_text = python_docs().split(0.1, seed=0)
    ids = train_text.tokens(tok, 10**7)
    held = held_text.tokens(tok, 65536)
    print(f"text: {train_text.source}: {len(ids):,} tokens; held out {len(held):,}; "
          f"vocabulary {len(tok):,}")
    out: dict[str, object] = {"text": train_text.source, "train_tokens": len(ids),
                              "steps": args.steps, "hidden": args.hidden,
                              "layers": args.layers, "lr": args.lr, "models": {}}
    paths = []
    for seed in (int(s) for s in args.seeds.split(",")):
        path = args.dir / f"independent-d{args.hidden}-L{args.layers}-s{args.steps}-{seed}"
        if (path / "info.json").exists():
            info = json.loads((path / "info.json").read_text())
            out["models"][seed] = info  # type: ignore[index]
            print(f"seed {seed}: trained before ({path}); held out {info['held_out_loss']:.2f}")
            paths.append(path)
            continue
        model = build(len(tok), args.hidden, args.layers, seed)
        curve: list[tuple[int, float]] = []
        t0 = time.time()
        train(model, ids, steps=args.steps, lr=args.lr, batch_size=args.batch,
              seq_len=args.seq, seed=seed, warmup=min(100, args.steps // 10),
              on_step=lambda s, loss, c=curve: c.append((s, loss)) if s % 100 == 0 else None)
        held_loss = float(eval_loss(model, held, seq_len=args.seq))
        info = {"seed": seed, "seconds": round(time.time() - t0, 1), "curve": curve,
                "held_out_loss": held_loss, **outliers(model, held, args.seq)}
        out["models"][seed] = info  # type: ignore[index]
        print(f"seed {seed}: {info['seconds']} s; loss " + ", ".join(
            f"{s}: {v:.2f}" for s, v in curve) + f"; held out {held_loss:.2f}; residual "
            f"max/median |act| {info['max_over_median']:.1f}, "
            f"{info['coordinates_over_10x']} coordinates over 10x")
        model.save_pretrained(path)
        (path / "info.json").write_text(json.dumps(info))
        paths.append(path)
    ident = jobs.identify(paths[0], paths[1])
    ev = ident.evidence
    print(f"identify: {ident.verdict}; z {ev.get('z')}, p {ev.get('p_value')}, held-out mean "
          f"cosine {ev.get('held_out_mean_cosine')} over {ev.get('tensors_tested')} tensors")
    for group, g in sorted((ev.get("groups") or {}).items()):
        print(f"  {group}: cosine {g['mean_cosine']}, z {g['z']}, p {g['p_value']:.3g}")
    out["identify"] = {"verdict": ident.verdict, "evidence": {
        k: v for k, v in ev.items() if k in ("z", "p_value", "held_out_mean_cosine",
                                             "tensors_tested", "groups")}}
    out["cross_run"] = cross_run(paths[0], paths[1], held, args.seq)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))


def cross_run(p1: Path, p2: Path, held: np.ndarray, seq: int) -> dict[str, object]:
    """The demo's cross-run estimate and SAE transport between two independent models, beside
    the same estimate against an exact re-gauging of model 1."""
    from transformers import AutoModelForCausalLM

    from gaugefix.apply import gauge_model
    from gaugefix.demo.experiments import sae_between
    from gaugefix.estimate import StatsOptions, estimate_gauge
    from gaugefix.group import SignedPerm

    m1, m2 = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for p in (p1, p2))
    d = m1.config.hidden_size
    probe = held[:4096]
    opts = StatsOptions(tokens=probe, n_tokens=len(probe))
    est = estimate_gauge(m1, m2, opts=opts)
    g = SignedPerm.random(d, 7)
    same = estimate_gauge(m1, gauge_model(m1, g), opts=opts)
    out: dict[str, object] = {
        "independent": est.summary(), "regauged_copy": {
            **same.summary(), "full_accuracy": same.gauge.compare(g)["full_accuracy"]}}
    print(f"estimated gauge, model 1 → model 2: median confidence "
          f"{est.summary()['median_confidence']:.3f}; against an exact re-gauging of model 1: "
          f"{same.summary()['median_confidence']:.3f} (full accuracy "
          f"{out['regauged_copy']['full_accuracy']:.3f})")  # type: ignore[index]
    n = (len(held) - 4096) // seq * seq
    ids = torch.from_numpy(held[4096:4096 + n]).view(-1, seq)
    half = ids.shape[0] * 2 // 3
    middle = m1.config.num_hidden_layers // 2
    sae = sae_between(m1, m2, est.gauge, None, ids[:half], ids[half:], middle, seed=0,
                      steps=1500, skip=1, massive=10.0)
    out["sae"] = sae
    print(f"SAE on model 1's residual after layer {middle}: NMSE on model 1 "
          f"{sae['A_original']:.3f}; on model 2 moved by the estimated gauge "
          f"{sae['B_d_estimated']:.3f}, by its permutation alone {sae['S_d_estimated']:.3f}, "
          f"not moved {sae['untransported']:.3f}")
    return out


if __name__ == "__main__":
    main()
