"""The demo's models: a trained base and two fine-tuning runs, every checkpoint saved in
its own random gauge (a stand-in for checkpoints whose charts differ).

The planted gauges are written to ``truth.json`` beside the checkpoints; only the
scoring code reads them, never an estimator. A finished lineage is cached and
reused by a later run with the same settings.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..apply import gauge_model
from ..arch import detect_family
from ..group import SignedPerm
from ..testing import MIX_A, MIX_B, corpus_model, train
from .corpus import Corpus


@dataclass(frozen=True)
class LineageSpec:
    family: str
    hidden_size: int
    layers: int
    base_steps: int
    ft_steps: int
    every: int
    ft_lr: float
    seed: int
    base_lr: float = 1e-2
    warmup: int = 0

    @property
    def key(self) -> str:
        return (f"{self.family}-d{self.hidden_size}-L{self.layers}-b{self.base_steps}"
                f"x{self.base_lr:g}-w{self.warmup}"
                f"-f{self.ft_steps}x{self.every}-lr{self.ft_lr:g}-s{self.seed}")

    @property
    def n_ckpts(self) -> int:
        return self.ft_steps // self.every


@dataclass
class Lineage:
    """Paths of the saved (gauged) checkpoints, and the planted gauges (truth)."""

    root: Path
    spec: LineageSpec
    base: Path
    run_a: list[Path]
    run_b: list[Path]
    steps: list[int]
    truth: dict[str, SignedPerm]  # checkpoint name -> gauge native chart -> saved chart

    def true_gauge(self, src: Path, dst: Path) -> SignedPerm:
        """The planted gauge from ``src``'s saved chart to ``dst``'s."""
        return self.truth[src.name].inverse().then(self.truth[dst.name])

    def load(self, path: Path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def build_lineage(root: Path, spec: LineageSpec, corpus: Corpus) -> Lineage:
    """Train and save the lineage under ``root`` (or reuse a finished one)."""
    root = root / spec.key
    done = root / "truth.json"
    names = ["base"] + [f"A-{k}" for k in range(1, spec.n_ckpts + 1)] + [
        f"B-{k}" for k in range(1, spec.n_ckpts + 1)]
    if not done.exists():
        truth = _train_and_save(root, spec, corpus, names)
        done.write_text(json.dumps({"spec": asdict(spec), "gauges": {
            k: g.to_json() for k, g in truth.items()}}))
    doc = json.loads(done.read_text())
    truth = {k: SignedPerm.from_json(v) for k, v in doc["gauges"].items()}
    n = spec.n_ckpts
    return Lineage(root, spec, root / "base", [root / f"A-{k}" for k in range(1, n + 1)],
                   [root / f"B-{k}" for k in range(1, n + 1)],
                   [k * spec.every for k in range(1, n + 1)], truth)


def _train_and_save(root: Path, spec: LineageSpec, corpus: Corpus,
                    names: list[str]) -> dict[str, SignedPerm]:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    base = corpus_model(spec.family, corpus.vocab_size, hidden_size=spec.hidden_size,
                        layers=spec.layers, seed=spec.seed)
    train(base, corpus.stream(300_000, spec.seed), steps=spec.base_steps, lr=spec.base_lr,
          seed=spec.seed)
    kind = "signed" if detect_family(base.config).allows_signs else "global"
    gauges = {name: SignedPerm.random(spec.hidden_size, 10_000 * spec.seed + i, kind=kind)
              for i, name in enumerate(names)}
    tokenizer = corpus.tokenizer()

    def save(model: torch.nn.Module, name: str) -> None:
        gauge_model(model, gauges[name]).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)

    save(base, "base")
    mix_a, mix_b = getattr(corpus, "run_mixes", (MIX_A, MIX_B))  # the corpus's own runs
    for run, mix, offset in (("A", mix_a, 1), ("B", mix_b, 2)):
        model, opt = copy.deepcopy(base), None
        tokens = corpus.stream(300_000, 100 * spec.seed + offset, mix)
        for k in range(1, spec.n_ckpts + 1):
            opt = train(model, tokens, steps=spec.every, lr=spec.ft_lr,
                        seed=1000 * offset + k, optimizer=opt, warmup=spec.warmup,
                        step_offset=(k - 1) * spec.every)
            save(model, f"{run}-{k}")
    return gauges
