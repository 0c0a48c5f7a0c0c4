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
             **save_kw) -> Path:
        path = tmp_path / (name or f"{family}-{seed}")
        build_tiny(family, seed=seed, generic=generic).save_pretrained(path, **save_kw)
        return path

    return make
