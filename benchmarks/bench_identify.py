"""`gaugefix identify` on pairs whose relation is known (issue 11): same, derived, unrelated.

From the cached lineages of bench_lineages.py (Llama, Qwen3, GPT-NeoX; the demo grammar and
random Markov languages; seeds 0-2; fine-tuning lr 5e-3, 2e-2, 6e-2; every checkpoint in its
own random gauge):

* same — a base and a copy re-gauged by `apply --random`;
* derived — a base and each run's last checkpoint, and the two runs' last checkpoints (a
  re-gauged fine-tune: every checkpoint is in its own gauge);
* unrelated — bases of the same family and shape trained from other initialisations.

Prints each pair's verdict and median relative distance after alignment, the distance
ranges per true relation (what DERIVED_MAX_DISTANCE is calibrated on) and the confusion table.

    python benchmarks/bench_identify.py [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_lineages import CORPORA, FAMILIES, LRS, SEEDS, Case
from gaugefix.apply import gauge_checkpoint
from gaugefix.canonical import DERIVED_MAX_DISTANCE, identify
from gaugefix.demo.lineage import build_lineage
from gaugefix.group import SignedPerm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gaugefix" /
                    "bench-lineages")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = []
    tmp = Path(tempfile.mkdtemp())
    bases: dict[tuple[str, str], list[Path]] = {}
    for fam, corpus in itertools.product(FAMILIES, CORPORA):
        for seed in SEEDS:
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
                    rows.append({"family": fam, "corpus": corpus, "seed": seed, "lr": lr,
                                 "truth": truth, "verdict": r.verdict,
                                 "distance": r.evidence.get("median_relative_distance", 0.0),
                                 "seconds": time.perf_counter() - t})
        for a, b in itertools.combinations(bases[(fam, corpus)], 2):
            r = identify(a, b)
            rows.append({"family": fam, "corpus": corpus, "truth": "unrelated",
                         "verdict": r.verdict,
                         "distance": r.evidence.get("median_relative_distance", 0.0)})
        print(fam, corpus, "done", flush=True)
    print(f"\nthreshold: derived if median relative distance ≤ {DERIVED_MAX_DISTANCE}")
    for truth in ("same", "derived", "unrelated"):
        d = [r["distance"] for r in rows if r["truth"] == truth]
        verdicts = {v: sum(r["verdict"] == v for r in rows if r["truth"] == truth)
                    for v in ("same", "derived", "unrelated")}
        print(f"  {truth:9s} n={len(d):3d} distance {np.min(d):.3f}–{np.max(d):.3f} "
              f"(median {np.median(d):.3f})  verdicts {verdicts}")
    for lr in LRS:
        sel = [r for r in rows if r["truth"] == "derived" and r.get("lr") == lr]
        d = [r["distance"] for r in sel]
        print(f"  derived at lr {lr:g}: distance {np.min(d):.3f}–{np.max(d):.3f}, called derived "
              f"{sum(r['verdict'] == 'derived' for r in sel)} of {len(sel)}")
    t = [r["seconds"] for r in rows if "seconds" in r]
    print(f"  time per pair: {np.mean(t):.2f} s mean, {np.max(t):.2f} s max")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
