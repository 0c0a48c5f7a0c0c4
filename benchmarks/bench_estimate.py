"""Estimation costs, as ratios against baselines measured in the same process.

1. Dense assignment: lapx ``lapjvs`` (gaugefix's default) against scipy's
   ``linear_sum_assignment`` on correlation-like |C| matrices (a planted signed
   permutation with drifted matched correlations and noise), d = 1024, 4096, 8192,
   and on uniform random matrices (the worst case) at d = 1024, 4096.
2. Statistics throughput: ``collect_stats`` (both models' forward passes, taps,
   centred GEMM, float64 merge) against a bare forward pass of both models.

    python benchmarks/bench_estimate.py [--sizes 1024,4096,8192] [--hidden 1024]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_apply import best_of
from gaugefix.apply import gauge_model
from gaugefix.group import SignedPerm
from gaugefix.match import solve_assignment
from gaugefix.stats import collect_stats, synthetic_tokens
from gaugefix.tiny import build_tiny


def correlation_like(d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = SignedPerm.random(d, seed)
    c = rng.normal(0, 0.08, size=(d, d))
    c[g.perm, np.arange(d)] = g.sign * rng.uniform(0.3, 1.0, size=d)
    return np.abs(c)


def bench_solvers(sizes: list[int]) -> None:
    print("dense assignment (best of 3; ratio = lapjvs / scipy)")
    for kind, maker, ds in (("correlation-like", correlation_like, sizes),
                            ("uniform random", lambda d: np.random.default_rng(1).random((d, d)),
                             [d for d in sizes if d <= 4096])):
        for d in ds:
            score = maker(d)
            p1, p2 = solve_assignment(score, "lapjvs"), solve_assignment(score, "scipy")
            same = np.isclose(score[p1, np.arange(d)].sum(), score[p2, np.arange(d)].sum())
            rep = 3 if d <= 4096 else 1
            t_lap = best_of(lambda s=score: solve_assignment(s, "lapjvs"), rep)
            t_sp = best_of(lambda s=score: solve_assignment(s, "scipy"), rep)
            print(f"  {kind:17s} d={d:5d}  scipy {t_sp * 1e3:8.1f} ms  lapjvs "
                  f"{t_lap * 1e3:8.1f} ms  ratio {t_lap / t_sp:5.2f}  same optimum: {same}")


def bench_stats(hidden: int, layers: int, n_tokens: int) -> None:
    model = build_tiny("llama", hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
                       num_key_value_heads=max(1, hidden // 256), vocab_size=32000,
                       max_position_embeddings=256)
    other = gauge_model(model, SignedPerm.random(hidden, 0))
    ids = synthetic_tokens(32000, n_tokens, 0)
    batches = torch.from_numpy(ids).reshape(-1, 128).split(8)

    @torch.no_grad()
    def bare() -> None:
        for b in batches:
            model.base_model(input_ids=b)
            other.base_model(input_ids=b)

    def stats() -> None:
        collect_stats(model, other, ids, seq_len=128, batch_size=8)

    bare()
    t_bare, t_stats = best_of(bare, 2), best_of(stats, 2)
    print(f"statistics, llama d={hidden} L={layers}, {n_tokens} tokens × {layers + 1} "
          f"positions:")
    print(f"  bare forward of both models {t_bare:6.2f} s ({n_tokens / t_bare:8.0f} tok/s)")
    print(f"  collect_stats               {t_stats:6.2f} s ({n_tokens / t_stats:8.0f} tok/s)"
          f"  ratio {t_stats / t_bare:4.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096,8192")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(2)
    bench_solvers([int(s) for s in args.sizes.split(",")])
    bench_stats(args.hidden, args.layers, args.tokens)


if __name__ == "__main__":
    main()
