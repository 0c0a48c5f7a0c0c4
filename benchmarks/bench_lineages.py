"""Gauge estimation on lineages it was not tuned on (issue 10), separate from the demo.

Each lineage: a base trained from scratch, then two fine-tuning runs from it (each run saves
a checkpoint every ``every`` steps), every checkpoint written in its own random gauge (B_d
for RMSNorm families, S_d × {±1} for LayerNorm ones). Lineages vary over families, corpora
(the demo grammar, and random Markov languages whose two runs speak different dialects),
seeds and fine-tuning learning rates. They are trained once and cached (``--cache``).

For every lineage and evidence source (``both``, the default; ``activations``; ``weights``),
the gauge from run A's last checkpoint to run B's is estimated four ways, and scored against
the planted gauge (full accuracy: position and sign right):

* endpoint — the two checkpoints matched directly;
* via base — A_n → base → B_n;
* composed — A_n → … → A_1 → base → B_1 → … → B_n, consecutive checkpoints matched;
* bridged — what ``gaugefix trajectory`` returns: weak steps bridged, the most confident path.

Confidence: of the coordinates the endpoint and the local estimates get wrong, the share
flagged low-confidence (recall of errors), and the share of right coordinates flagged (false
alarms).
Results are printed as one table, and as means and ranges.

    python benchmarks/bench_lineages.py [--quick] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gaugefix.demo.corpus import Corpus
from gaugefix.demo.lineage import Lineage, LineageSpec, build_lineage
from gaugefix.demo.markov import MarkovCorpus
from gaugefix.estimate import StatsOptions, compose_gauges, estimate_gauge, trajectory
from gaugefix.group import SignedPerm
from gaugefix.match import MatchResult
from gaugefix.model import Model, open_model

FAMILIES = ["llama", "qwen3", "gpt_neox"]
CORPORA = ["grammar", "markov"]
SEEDS = [0, 1, 2]
LRS = [5e-3, 2e-2, 6e-2]


@dataclass(frozen=True)
class Case:
    family: str
    corpus: str
    seed: int
    lr: float

    def corpus_obj(self) -> Corpus:
        return Corpus() if self.corpus == "grammar" else MarkovCorpus(seed=self.seed)

    def spec(self, quick: bool) -> LineageSpec:
        return LineageSpec(self.family, 64, 2, base_steps=300, ft_steps=120 if quick else 200,
                           every=20 if quick else 25, ft_lr=self.lr, seed=self.seed,
                           base_lr=3e-3)


SOURCES = ("both", "activations", "weights")


def errors_flagged(r: MatchResult, truth: SignedPerm) -> tuple[int, int, int, int]:
    """(wrong, wrong and flagged, right, right and flagged) coordinates of one estimate."""
    wrong = (r.gauge.perm != truth.perm) | (r.gauge.sign != truth.sign)
    flagged = r.confidence < r.threshold
    return (int(wrong.sum()), int((wrong & flagged).sum()), int((~wrong).sum()),
            int((~wrong & flagged).sum()))


def evaluate(lin: Lineage, probe: np.ndarray, sources: tuple[str, ...] = SOURCES
             ) -> dict[str, Any]:
    """Per source: endpoint, via base, composed (consecutive steps) and bridged (the
    trajectory's most confident path) accuracy A_n → B_n, the weakest local step, and the
    flag's (wrong, caught, right, false alarms) over the endpoint and every local step."""
    a_n, b_n = lin.run_a[-1], lin.run_b[-1]
    truth = lin.true_gauge(a_n, b_n)
    path = [*lin.run_a[::-1], lin.base, *lin.run_b]
    opts = StatsOptions(tokens=probe, n_tokens=len(probe))
    models: dict[Path, Model] = {}  # each opened once, its module loaded once
    row: dict[str, Any] = {}
    for source in sources:
        cache: dict[tuple[Path, Path], MatchResult] = {}

        def match(x: Path, y: Path, source: str = source,
                  cache: dict[tuple[Path, Path], MatchResult] = cache) -> MatchResult:
            if (x, y) not in cache:
                for m in (x, y):
                    if m not in models:
                        models[m] = open_model(m)
                cache[(x, y)] = estimate_gauge(models[x], models[y], source=source, opts=opts)
            return cache[(x, y)]

        def chain(p: list[Path], match: Callable[[Path, Path], MatchResult] = match
                  ) -> SignedPerm:
            return compose_gauges([match(x, y).gauge for x, y in itertools.pairwise(p)])

        endpoint = match(a_n, b_n)
        locals_ = [(match(x, y), lin.true_gauge(x, y)) for x, y in itertools.pairwise(path)]
        flags = np.sum([errors_flagged(r, t) for r, t in [(endpoint, truth), *locals_]], 0)
        bridged = trajectory(path, source=source, opts=opts)
        row[source] = {
            "endpoint": endpoint.gauge.compare(truth)["full_accuracy"],
            "via_base": chain([a_n, lin.base, b_n]).compare(truth)["full_accuracy"],
            "composed": chain(path).compare(truth)["full_accuracy"],
            "bridged": bridged.gauge.compare(truth)["full_accuracy"],
            "bridged_path": bridged.path,
            "flags": [int(x) for x in flags],
            "weakest_step": min(r.gauge.compare(t)["full_accuracy"] for r, t in locals_),
        }
    return row


def summarise(rows: list[dict[str, Any]], sources: tuple[str, ...] = SOURCES) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in sources:
        for route in ("endpoint", "via_base", "composed", "bridged", "weakest_step"):
            v = [r[source][route] for r in rows]
            out[f"{source}/{route}"] = {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                        "max": float(np.max(v))}
        wrong, caught, right, alarms = np.sum([r[source]["flags"] for r in rows], axis=0)
        out[f"{source}/error_recall"] = float(caught / wrong) if wrong else None
        out[f"{source}/false_alarm_rate"] = float(alarms / right) if right else None
        out[f"{source}/lineages_endpoint_below_60"] = sum(r[source]["endpoint"] < 0.6
                                                           for r in rows)
        out[f"{source}/lineages_bridged_below_99"] = sum(r[source]["bridged"] < 0.99
                                                          for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a reduced grid (what the suite runs)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gaugefix" /
                    "bench-lineages")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--probe-tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    grid = ([Case(f, c, 0, 2e-2) for f in ("llama", "gpt_neox") for c in CORPORA]
            if args.quick else
            [Case(*k) for k in itertools.product(FAMILIES, CORPORA, SEEDS, LRS)])
    rows = []
    for case in grid:
        t = time.perf_counter()
        corpus = case.corpus_obj()
        lin = build_lineage(args.cache / case.corpus, case.spec(args.quick), corpus)
        trained = time.perf_counter() - t
        probe = corpus.stream(args.probe_tokens, seed=987_654)
        row = {"family": case.family, "corpus": case.corpus, "seed": case.seed, "lr": case.lr,
               **evaluate(lin, probe)}
        rows.append(row)
        print(f"{case.family:9s} {case.corpus:8s} s{case.seed} lr{case.lr:<6g} " + "  ".join(
            f"{src[:4]} {row[src]['endpoint']:6.1%} {row[src]['via_base']:6.1%} "
            f"{row[src]['composed']:6.1%} {row[src]['bridged']:6.1%}" for src in SOURCES)
            + f"  (lineage {trained:5.1f} s, scoring {time.perf_counter() - t - trained:5.1f} s)",
            flush=True)
    summary = summarise(rows)
    print("\nsource/route: mean [min, max] over", len(rows), "lineages")
    for k, v in summary.items():
        print(f"  {k:40s} " + (f"{v['mean']:6.1%} [{v['min']:6.1%}, {v['max']:6.1%}]"
                               if isinstance(v, dict) else
                               (f"{v:.3f}" if isinstance(v, float) else str(v))))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
