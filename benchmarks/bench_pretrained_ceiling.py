"""The paper's ceiling on a pretrained model's own activations over real text (issue 29, the
first of its experiments).

SmolLM2-135M-Instruct (the registry's GGUF package, dequantised to float32), real English
from :func:`gaugefix.demo.realtext.python_docs` tokenised with the model's own tokenizer, and
for each positive-sign fraction p a planted signed permutation with that fraction: B = Q·A
exactly, then the demo's :func:`~gaugefix.demo.experiments.ceiling` — raw signed matching
(``signed``: correlations as they are) against sign-marginalised matching (``signmarg``)
and permutation-only matching (``perm``) — scores the permutation and
full (permutation and signs) accuracy of each method on the statistics of the two residual
streams over the same tokens. Several seeds: mean and range per p.

    python benchmarks/bench_pretrained_ceiling.py [--tokens 2048] [--seeds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_real import smollm2_checkpoint

FRACTIONS = [0.1, 0.3, 0.5, 0.7, 0.9]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--fractions", type=str, default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "gaugefix-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gaugefix.demo.experiments import METHODS, ceiling
    from gaugefix.demo.realtext import python_docs

    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt = smollm2_checkpoint(args.dir)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    text = python_docs()
    probe = text.tokens(tok, args.tokens)
    fractions = [float(f) for f in args.fractions.split(",")]
    print(f"text: {text.source}, {len(text.documents)} documents, {text.n_bytes / 1e6:.2f} MB "
          f"(sha256 {text.digest[:12]}); probe: {len(probe)} tokens of SmolLM2's tokenizer")
    runs = [ceiling(model, probe, fractions, seed=1000 * s) for s in range(args.seeds)]
    table = []
    heads = [f"{m} {w}" for m in METHODS for w in ("perm", "full")]
    print(f"{'p':>4} | " + " | ".join(f"{h:>16}" for h in heads))
    for i, p in enumerate(fractions):
        row: dict[str, object] = {"positive_fraction": p}
        cells = []
        for method in METHODS:
            for what in ("perm_accuracy", "full_accuracy"):
                v = np.array([r[i][method][what] for r in runs])
                row[f"{method}_{what}"] = {"mean": float(v.mean()), "min": float(v.min()),
                                           "max": float(v.max())}
                cells.append(f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]")
        table.append(row)
        print(f"{p:>4} | " + " | ".join(f"{c:>16}" for c in cells))
    if args.json is not None:
        args.json.write_text(json.dumps({"text": text.source, "digest": text.digest,
                                         "tokens": len(probe), "seeds": args.seeds,
                                         "rows": table}, indent=2))


if __name__ == "__main__":
    main()
