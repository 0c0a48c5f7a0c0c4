"""`gaugefix apply` against the I/O floor, measured in the same process.

Baselines: a raw file copy of the checkpoint (shutil) and a safetensors
load-then-save round trip with no transform. Prints seconds and ratios; the
target is apply ≈ round trip (I/O-bound), i.e. the gather-and-sign is free.

    python benchmarks/bench_apply.py [--hidden 1024] [--layers 8] [--shard-mb 200]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gaugefix.apply import gauge_checkpoint
from gaugefix.group import SignedPerm
from gaugefix.tiny import build_tiny


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny("llama", hidden_size=args.hidden,
                           intermediate_size=args.hidden * 11 // 4,
                           num_hidden_layers=args.layers, vocab_size=args.vocab,
                           num_attention_heads=16, num_key_value_heads=4)
        model.to(getattr(torch, args.dtype)).save_pretrained(
            root / "A", max_shard_size=f"{args.shard_mb}MB")
        del model
        size = sum(p.stat().st_size for p in (root / "A").glob("*.safetensors")) / 1e9
        g = SignedPerm.random(args.hidden, seed=0)

        def roundtrip() -> None:
            (root / "R").mkdir()
            for f in (root / "A").glob("*.safetensors"):
                save_file(load_file(f), root / "R" / f.name, metadata={"format": "pt"})

        runs = {
            "copy (shutil)": lambda: shutil.copytree(root / "A", root / "C"),
            "safetensors round trip": roundtrip,
            "gaugefix apply": lambda: gauge_checkpoint(root / "A", root / "B", g, progress=False),
        }
        times = {}
        for name, fn in runs.items():
            times[name] = timed(fn)
        for d in ("B", "C", "R"):
            shutil.rmtree(root / d)
        # second pass with warm page cache, order reversed to even out drift
        for name, fn in reversed(runs.items()):
            times[name] = min(times[name], timed(fn))

        base = times["safetensors round trip"]
        print(f"checkpoint: llama d={args.hidden} L={args.layers} {args.dtype}, {size:.2f} GB")
        for name, t in times.items():
            print(f"  {name:24s} {t:6.2f} s  {size / t:5.2f} GB/s  ratio vs round trip "
                  f"{t / base:4.2f}")


if __name__ == "__main__":
    main()
