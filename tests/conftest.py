"""Shared fixtures: tiny offline models and an in-process CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

import transformers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gaugefix.cli import app  # noqa: E402
from gaugefix.tiny import TINY_SPECS, build_tiny  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

FAMILIES = sorted(TINY_SPECS)
LAYERNORM_FAMILIES = ["gpt2", "gpt_neox", "olmo"]
RMS_FAMILIES = [f for f in FAMILIES if f not in LAYERNORM_FAMILIES]


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object, ok: bool = True):
        result = self.runner.invoke(app, [str(a) for a in args])
        if ok and result.exit_code != 0:
            raise AssertionError(
                f"gaugefix {' '.join(map(str, args))} exited {result.exit_code}:\n"
                f"{result.output}\n{result.stderr if result.stderr_bytes else ''}\n"
                f"{result.exception!r}"
            )
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def tiny_ckpt(tmp_path):
    def make(family: str, seed: int = 0, generic: bool = True, name: str | None = None,
             **model_kw) -> Path:
        path = tmp_path / (name or f"{family}-{seed}")
        build_tiny(family, seed=seed, generic=generic, **model_kw).save_pretrained(path)
        return path

    return make


# ---------------------------------------------------------------------------- trained models
class Lineage:
    """A trained base and two fine-tuning runs from it, checkpoints kept in memory."""

    def __init__(self, family: str, *, base_steps: int, ft_steps: int, every: int, lr: float,
                 d: int = 64) -> None:
        import copy

        from gaugefix.demo.corpus import Corpus
        from gaugefix.demo.lineage import MIX_A, MIX_B
        from gaugefix.demo.train import corpus_model, train

        self.corpus = Corpus()
        self.d = d
        self.base = corpus_model(family, self.corpus.vocab_size, hidden_size=d, seed=0)
        self.base_opt = train(self.base, self.corpus.stream(100_000, 0), steps=base_steps,
                              lr=3e-3, seed=0)
        mixes = {"A": MIX_A, "B": MIX_B}
        self.runs: dict[str, list] = {}
        for k, (name, mix) in enumerate(mixes.items(), start=1):
            model, opt, ckpts = copy.deepcopy(self.base), None, []
            tokens = self.corpus.stream(100_000, 10 * k, mix)
            for step in range(ft_steps // every):
                opt = train(model, tokens, steps=every, lr=lr, seed=100 * k + step,
                            optimizer=opt)
                ckpts.append(copy.deepcopy(model))
            self.runs[name] = ckpts

    def probe(self, n: int = 4096, seed: int = 77):
        return self.corpus.stream(n, seed)


@pytest.fixture(scope="session")
def trained_llama():
    """A Llama-family model trained on the generated corpus (generic gains)."""
    return Lineage("llama", base_steps=300, ft_steps=0, every=1, lr=0.0)


@pytest.fixture(scope="session")
def trained_gpt2():
    return Lineage("gpt2", base_steps=300, ft_steps=0, every=1, lr=0.0)


@pytest.fixture(scope="session")
def drift_lineage():
    """Two runs fine-tuned hard enough from one base that their endpoints drift apart."""
    return Lineage("llama", base_steps=300, ft_steps=400, every=25, lr=2e-2)
