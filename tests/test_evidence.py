"""Evidence weighed by reliability (gaugefix.match.match_evidence), on matrices built so the
answer is known; and the benchmark of lineages, reduced."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from gaugefix.group import SignedPerm
from gaugefix.match import LOW_MARGIN_SD, Evidence, block_weight, match_evidence, standardized


def _planted(g: SignedPerm, strength: float, noise: float, seed: int) -> np.ndarray:
    """C[j, i] ≈ strength·sign_i where j = perm[i], noise elsewhere."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, noise, (g.d, g.d))
    c[g.perm, np.arange(g.d)] += strength * g.sign
    return np.clip(c, -0.99, 0.99)


def test_noise_weighs_little_and_cannot_outvote_evidence():
    g = SignedPerm.random(48, seed=1)
    good = _planted(g, 0.6, 0.08, seed=2)
    noise = np.clip(np.random.default_rng(3).normal(0, 0.3, (48, 48)), -0.99, 0.99)
    w_good, w_noise = (block_weight(standardized(np.abs(np.arctanh(b)))) for b in (good, noise))
    assert w_noise < w_good / 3
    for blocks in ([good], [good, noise], [noise, good, noise, noise]):
        r = match_evidence(Evidence(blocks, [str(k) for k in range(len(blocks))]))
        assert r.gauge == g
        assert (r.confidence > LOW_MARGIN_SD).all()


def test_combined_evidence_is_equivariant():
    """Moving B's chart by h moves the estimate and the confidences with it."""
    g, h = SignedPerm.random(32, seed=4), SignedPerm.random(32, seed=5)
    blocks = [_planted(g, s, 0.2, seed=k) for k, s in enumerate((0.3, 0.5, 0.2))]
    r = match_evidence(Evidence(blocks, ["a", "b", "c"]))
    # B' = h·B: B's coordinate h.perm[i] becomes B' coordinate i, with sign h.sign[i]
    moved = [b[:, h.perm] * h.sign for b in blocks]
    r2 = match_evidence(Evidence(moved, ["a", "b", "c"]))
    assert r2.gauge == r.gauge.then(h)
    np.testing.assert_allclose(r2.confidence, r.confidence[h.perm], atol=1e-9)


def test_coordinates_the_evidence_cannot_tell_apart_are_flagged():
    """Two of B's coordinates with identical evidence: whichever way the assignment goes, both
    are flagged (margin 0), the others are not."""
    g = SignedPerm.identity(24)
    c = _planted(g, 0.7, 0.05, seed=6)
    c[:, 5] = c[:, 9]  # B's 5 and 9 look the same
    r = match_evidence(Evidence([c], ["activations"]))
    assert set(r.low_confidence()) == {5, 9}


def _bench():
    path = Path(__file__).parents[1] / "benchmarks" / "bench_lineages.py"
    spec = importlib.util.spec_from_file_location("bench_lineages", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_of_lineages_reduced(tmp_path):
    """One lineage of the benchmark (Llama, a Markov language, the quick schedule), scored by
    the benchmark's own code for the default source: every route returns a gauge between the
    right charts, the trajectory's path runs from A_n to B_n, and the flag's counts cover
    every coordinate of every estimate (how accurate it is depends on the run: the benchmark
    itself reports that)."""
    bench = _bench()
    case = bench.Case("llama", "markov", 0, 5e-3)
    corpus = case.corpus_obj()
    lin = bench.build_lineage(tmp_path / case.corpus, case.spec(True), corpus)
    path = [*lin.run_a[::-1], lin.base, *lin.run_b]
    row = bench.evaluate(lin, corpus.stream(2048, seed=987_654), sources=("both",))["both"]
    wrong, caught, right, alarms = row["flags"]
    assert wrong + right == 64 * len(path)  # the endpoint and every local step
    assert 0 <= caught <= wrong and 0 <= alarms <= right
    assert row["bridged_path"][0] == 0 and row["bridged_path"][-1] == len(path) - 1
    for route in ("endpoint", "via_base", "composed", "bridged", "weakest_step"):
        assert 0.0 <= row[route] <= 1.0
    summary = bench.summarise([{"both": row}], sources=("both",))
    assert summary["both/bridged"]["mean"] == row["bridged"]
