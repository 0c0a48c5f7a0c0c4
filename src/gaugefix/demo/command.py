"""``gaugefix demo`` as one call: the embedded demo, or the experiments on a pretrained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import GaugefixError
from .run import DemoConfig, run_demo


def run_requested(out_dir: Path, *, quick: bool = False, seed: int = 0, seeds: int = 1,
                  device: str = "cpu", model: str | None = None, tiny: Path | None = None,
                  console: Console | None = None) -> dict[str, Any]:
    """``gaugefix demo``: the embedded demo, or with ``model`` its experiments on that
    pretrained model (``tiny``: an earlier demo's output for the comparison column); options
    that do not go together are refused before anything runs."""
    if device not in ("cpu", "cuda"):
        raise GaugefixError(f"unknown device {device!r}; choose cpu or cuda")
    if model is not None:
        from .pretrained import ModelTierConfig, run_model_demo

        if seeds != 1:
            raise GaugefixError("--seeds repeats the tiny demo's training runs; with --model "
                                "run once per --seed")
        return run_model_demo(out_dir, ModelTierConfig(model, quick=quick, seed=seed,
                                                       device=device), tiny, console=console)
    if tiny is not None:
        raise GaugefixError("--tiny goes with --model (it names the tiny demo's results to "
                            "compare with)")
    return run_demo(out_dir, DemoConfig(quick=quick, seed=seed, seeds=seeds, device=device),
                    console=console)
