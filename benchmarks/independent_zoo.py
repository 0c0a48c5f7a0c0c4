"""Independently trained models and their derivatives, made here on real text (issue 33).

A population for calibrating `identify` against convergent learning: small Llama models trained
from scratch with different seeds on CPython's documentation (:mod:`gaugefix.demo.realtext`),
over a grid of what convergent learning should depend on —

* width (64, 128, 256), depth (2, 4 layers) and training length (400, 1200 steps);
* a shared tokenizer (a 4,096-token byte-level BPE trained here on the training text) or not
  (a second BPE trained on the other half of the text: other merges, other ids);
* the same corpus or different halves of it;

and, from one of those models, derived ones: an exact re-gauging, full fine-tunes at three
learning rates, 1/8 of the residual coordinates pruned, a layer dropped. Every model is trained
once and cached under ``root`` (config, weights, tokenizer): a later run reuses it.

    from independent_zoo import pairs
    for p in pairs(root): ...   # Pair(name, a, b, related, what)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from identity_zoo import Pair, _load, _prune, _relayer, _save

VOCAB = 4096
BATCH, SEQ, LR = 8, 128, 3e-3


@dataclass(frozen=True)
class Recipe:
    """One model trained from scratch."""

    width: int
    layers: int
    steps: int
    seed: int
    tokenizer: str = "shared"  # or "other"
    corpus: str = "all"  # or "first", "second"

    @property
    def name(self) -> str:
        return (f"d{self.width}-L{self.layers}-t{self.steps}-{self.tokenizer}-{self.corpus}"
                f"-s{self.seed}")


# pairs of independently trained models: (A, B, what differs besides the seed)
INDEPENDENT: list[tuple[Recipe, Recipe, str]] = [
    (Recipe(64, 2, 400, 1), Recipe(64, 2, 400, 2), "d 64, 2 layers, 400 steps"),
    (Recipe(128, 4, 400, 1), Recipe(128, 4, 400, 2), "d 128, 4 layers, 400 steps"),
    (Recipe(128, 4, 400, 1), Recipe(128, 4, 400, 3), "d 128, 4 layers, 400 steps"),
    (Recipe(128, 4, 400, 2), Recipe(128, 4, 400, 3), "d 128, 4 layers, 400 steps"),
    (Recipe(128, 4, 1200, 1), Recipe(128, 4, 1200, 2), "d 128, 4 layers, 1200 steps"),
    (Recipe(256, 4, 400, 1), Recipe(256, 4, 400, 2), "d 256, 4 layers, 400 steps"),
    (Recipe(256, 4, 1200, 1), Recipe(256, 4, 1200, 2), "d 256, 4 layers, 1200 steps"),
    (Recipe(128, 4, 400, 1, corpus="first"), Recipe(128, 4, 400, 2, corpus="second"),
     "d 128, different halves of the text"),
    (Recipe(128, 4, 400, 1), Recipe(128, 4, 400, 2, tokenizer="other"),
     "d 128, different tokenizers"),
    (Recipe(128, 4, 400, 1), Recipe(256, 4, 400, 2), "widths 128 and 256"),
    (Recipe(128, 2, 400, 1), Recipe(128, 4, 400, 2), "depths 2 and 4"),
]
BASE = Recipe(128, 4, 400, 1)
FINE_TUNE_LRS = (1e-3, 3e-3, 1e-2)
FINE_TUNE_STEPS = 200


def _bpe(documents: tuple[str, ...], path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    from gaugefix.testing import bpe_tokenizer

    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tok = bpe_tokenizer(documents, VOCAB, eos="<|endoftext|>")
    tok.save_pretrained(path)
    return tok


class Zoo:
    def __init__(self, root: Path) -> None:
        from gaugefix.demo.realtext import RealText, python_docs

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        train, self.held = python_docs().split(0.1, seed=0)
        half = len(train.documents) // 2
        self.texts = {"all": train, "first": RealText(train.documents[:half], "first"),
                      "second": RealText(train.documents[half:], "second")}
        self.tokenizers = {"shared": _bpe(train.documents, root / "tok-shared"),
                           "other": _bpe(self.texts["second"].documents[::-1],
                                         root / "tok-other")}
        self._ids: dict[tuple[str, str], np.ndarray] = {}

    def ids(self, tokenizer: str, corpus: str) -> np.ndarray:
        key = (tokenizer, corpus)
        if key not in self._ids:
            self._ids[key] = self.texts[corpus].tokens(self.tokenizers[tokenizer], 10**7)
        return self._ids[key]

    def trained(self, r: Recipe) -> Path:
        from bench_independent import build
        from gaugefix.testing import eval_loss, train

        path = self.root / r.name
        if (path / "info.json").exists():
            return path
        tok = self.tokenizers[r.tokenizer]
        model = build(len(tok), r.width, r.layers, r.seed)
        t0 = time.time()
        train(model, self.ids(r.tokenizer, r.corpus), steps=r.steps, lr=LR, batch_size=BATCH,
              seq_len=SEQ, seed=r.seed, warmup=min(100, r.steps // 10))
        held = self.held.tokens(tok, 8192)
        info = {"recipe": r.__dict__, "seconds": round(time.time() - t0, 1),
                "held_out_loss": eval_loss(model, held, seq_len=SEQ)}
        _publish(path, model, tok, info)
        print(f"  trained {r.name}: held-out loss {info['held_out_loss']:.2f} "
              f"({info['seconds']} s)", flush=True)
        return path

    def fine_tuned(self, base: Path, lr: float) -> Path:
        from transformers import AutoModelForCausalLM

        from gaugefix.testing import eval_loss, train

        path = self.root / f"{base.name}-ft{lr:g}"
        if (path / "info.json").exists():
            return path
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tok = self.tokenizers["shared"]
        train(model, self.ids("shared", "second"), steps=FINE_TUNE_STEPS, lr=lr,
              batch_size=BATCH, seq_len=SEQ, seed=99)
        info = {"from": base.name, "lr": lr, "steps": FINE_TUNE_STEPS,
                "held_out_loss": eval_loss(model, self.held.tokens(tok, 8192), seq_len=SEQ)}
        _publish(path, model, tok, info)
        return path

    def edited(self, base: Path, name: str, edit: Any) -> Path:
        path = self.root / f"{base.name}-{name}"
        if not (path / "model.safetensors").exists():
            _save(edit(_load(base)), path)
        return path

    def regauged(self, base: Path) -> Path:
        from gaugefix.apply import gauge_checkpoint
        from gaugefix.group import SignedPerm

        path = self.root / f"{base.name}-regauged"
        if not (path / "model.safetensors").exists():
            d = json.loads((base / "config.json").read_text())["hidden_size"]
            gauge_checkpoint(base, path, SignedPerm.random(d, 11))
        return path


def _publish(path: Path, model: Any, tok: Any, info: dict[str, Any]) -> None:
    import shutil

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "info.json").write_text(json.dumps(info))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _residual_axes(folder: Path) -> dict[str, int | None]:
    from gaugefix.model import open_model

    m = open_model(folder)
    return {k: (op.residual_axis if op.one_stream else None) for k, op in m.plan.items()}


def pairs(root: Path) -> list[Pair]:
    """Every pair of the population, its models trained (or read from ``root``)."""
    zoo = Zoo(root)
    out = []
    for a, b, what in INDEPENDENT:
        pa, pb = zoo.trained(a), zoo.trained(b)
        out.append(Pair(f"indep {a.name} ~ {b.name}", pa, pb, False,
                        f"independently trained: {what}"))
    base = zoo.trained(BASE)
    out.append(Pair(f"regauged {BASE.name}", base, zoo.regauged(base), True,
                    "an exact re-gauging"))
    for lr in FINE_TUNE_LRS:
        out.append(Pair(f"ft lr {lr:g} {BASE.name}", base, zoo.fine_tuned(base, lr), True,
                        f"full fine-tune, lr {lr:g}, {FINE_TUNE_STEPS} steps on the other "
                        "half of the text"))
    keep = np.sort(np.random.default_rng(5).permutation(BASE.width)[: BASE.width * 7 // 8])
    axes = _residual_axes(base)
    out.append(Pair(f"pruned {BASE.name}", base, zoo.edited(
        base, f"pruned{len(keep)}", lambda ck: _prune(ck, axes, keep)), True,
        f"residual coordinates pruned to {len(keep)}"))
    order = tuple(i for i in range(BASE.layers) if i != 2)
    out.append(Pair(f"layer-dropped {BASE.name}", base, zoo.edited(
        base, "drop2", lambda ck: _relayer(ck, order)), True, "layer 2 dropped"))
    return out
