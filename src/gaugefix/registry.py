"""What can be transported and merged: kinds and merge methods with their own metadata.

The CLI is built from these tables (argument help, which option goes with which kind, the
weight range of a method), so adding a kind is one entry here plus its adapter module. The
tables are light (no torch): an adapter is named as ``module:function`` and imported when
it runs, so ``gaugefix --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import GaugefixError


@dataclass(frozen=True)
class TransportKind:
    """A format adapter: ``adapter(src, dst, gauge, *, record, overwrite, **options)``."""

    name: str
    target: str  # "gaugefix.transport.<module>:<function>"
    help: str
    options: tuple[str, ...] = ()  # keyword options it takes beyond the common ones
    per_slot: bool = False  # takes one gauge per slot (a sequence; None: unchanged)

    def adapter(self) -> Callable[..., dict[str, Any]]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    help: str
    weight_range: tuple[float, float] | None = (0.0, 1.0)  # None: any finite scale
    needs_base: bool = False


def _kinds(*kinds: TransportKind) -> dict[str, TransportKind]:
    return {k.name: k for k in kinds}


_T = "gaugefix.transport."
TRANSPORT_KINDS: dict[str, TransportKind] = _kinds(
    TransportKind("steering", _T + "steering:transport_steering",
                  "steering vectors (.pt/.safetensors/.npy, steering-vectors, repeng GGUF)"),
    TransportKind("sae", _T + "sae:transport_sae",
                  "SAELens or sparsify SAE / transcoder folder"),
    TransportKind("neurons", _T + "neurons:transport_neurons",
                  "neuron lists and attributions (JSON, JSONL, CSV) of residual coordinates"),
    TransportKind("lora", _T + "lora:transport_lora", "PEFT LoRA adapter folder",
                  options=("model", "family")),
    TransportKind("optim", _T + "optim:transport_optim",
                  "Trainer checkpoint's optimizer state (or a bare optimizer.pt)",
                  options=("model",)),
    TransportKind("gemmascope", _T + "gemmascope:transport_gemmascope",
                  "Gemma Scope params.npz, Gemma Scope 2 params*.safetensors"),
    TransportKind("crosscoder", _T + "crosscoder:transport_crosscoder",
                  "crosscoder (ckkissane, dictionary_learning); one gauge per slot",
                  per_slot=True),
    TransportKind("clt", _T + "clt:transport_clt",
                  "circuit-tracer cross-layer transcoder or per-layer transcoder set"),
)

MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", "(1−w)·A + w·B"),
    MergeMethod("slerp", "spherical interpolation per tensor, weight w"),
    MergeMethod("task-arithmetic", "base + (A − base) + w·(B − base)", weight_range=None,
                needs_base=True),
)}


def transport_kind(name: str) -> TransportKind:
    if name not in TRANSPORT_KINDS:
        raise GaugefixError(f"unknown kind {name!r}; choose from {', '.join(TRANSPORT_KINDS)}")
    return TRANSPORT_KINDS[name]


def merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise GaugefixError(f"unknown merge method {name!r}; choose from "
                            f"{', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def check_options(kind: TransportKind, options: dict[str, Any]) -> None:
    """Each option goes with the kinds that declare it; every misplaced one named at once."""
    wrong = [o for o in options if o not in kind.options]
    if wrong:
        where = {o: [k.name for k in TRANSPORT_KINDS.values() if o in k.options] for o in wrong}
        raise GaugefixError("; ".join(
            f"--{o} goes with the {' and '.join(where[o]) or 'no'} kind"
            f"{'s' if len(where[o]) != 1 else ''}, not {kind.name}" for o in wrong))


def kinds_help() -> str:
    return "; ".join(f"{k.name}: {k.help}" for k in TRANSPORT_KINDS.values())


def methods_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in MERGE_METHODS.values())


def weight_help() -> str:
    """Each method's weight range, as the merge command's help says it."""
    ranges: dict[str, list[str]] = {}
    for m in MERGE_METHODS.values():
        r = "any finite scale" if m.weight_range is None else \
            f"{m.weight_range[0]:g}..{m.weight_range[1]:g}"
        ranges.setdefault(r, []).append(m.name)
    return "; ".join(f"{r} for {' and '.join(names)}" for r, names in ranges.items())


# what each kind's option means to it: the CLI's help for --model and --family comes from here
OPTION_HELP: dict[tuple[str, str], str] = {
    ("lora", "model"): "the base checkpoint (for its family)",
    ("lora", "family"): "the base model's family",
    ("optim", "model"): "the checkpoint a bare optimizer.pt belongs to",
}


def option_help(option: str) -> str:
    """The help of a transport option: what it means to each kind that declares it."""
    return "; ".join(f"{k.name}: {OPTION_HELP.get((k.name, option), option)}"
                     for k in TRANSPORT_KINDS.values() if option in k.options)
