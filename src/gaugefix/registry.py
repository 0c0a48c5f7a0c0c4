"""What can be transported and merged: kinds and merge methods with their implementations.

The CLI is built from these tables (argument help, which option goes with which kind, the
weight range of a method, whether it takes a base), so adding a kind is one entry here plus
its adapter module, and adding a merge method is one decorated function here. The tables
are light (no torch): an adapter is named as ``module:function`` and imported when it runs;
a merge method's arithmetic is written with tensor methods alone, so this module imports
no torch either, and ``gaugefix --help`` stays fast.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
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
    """A merge method: ``combine(a, b, w, base, **extra)`` on float64 blocks of one tensor
    (A, B in A's chart, the base or ``None``) returns the merged block; ``extra`` is what
    ``per_tensor(blocks, w, **options)`` returned from a first pass over the tensor's
    ``(a, b, base)`` blocks, or, for a method without one, the ``options``."""

    name: str
    help: str
    combine: Callable[..., Any]
    weight_range: tuple[float, float] | None = (0.0, 1.0)  # None: any finite scale
    takes_base: bool = False  # needs a base; a method that does not refuses one
    options: tuple[str, ...] = ()  # keyword options it takes (merge_checkpoints(options=))
    per_tensor: Callable[..., dict[str, Any]] | None = None


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str, help: str, *,
                          weight_range: tuple[float, float] | None = (0.0, 1.0),
                          takes_base: bool = False, options: tuple[str, ...] = (),
                          per_tensor: Callable[..., dict[str, Any]] | None = None
                          ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function is the method's elementwise ``combine`` (see
    :class:`MergeMethod`), registered under ``name`` with its help, weight range, base and
    options."""
    def register(combine: Callable[..., Any]) -> Callable[..., Any]:
        if name in MERGE_METHODS:
            raise GaugefixError(f"merge method {name!r} is registered twice")
        MERGE_METHODS[name] = MergeMethod(name, help, combine, weight_range, takes_base,
                                          options, per_tensor)
        return combine
    return register


@register_merge_method("linear", "(1−w)·A + w·B")
def linear(a: Any, b: Any, w: float, base: Any) -> Any:
    return (1 - w) * a + w * b


def slerp_coefficients(blocks: Iterable[tuple[Any, Any, Any]], w: float, eps: float = 1e-8
                       ) -> dict[str, float]:
    """slerp's weights on A and B for one tensor, from norms and dot product accumulated
    over its blocks (a first pass; the blend is the second)."""
    na2 = nb2 = dot = 0.0
    for xa, xb, _ in blocks:
        na2, nb2, dot = na2 + float(xa @ xa), nb2 + float(xb @ xb), dot + float(xa @ xb)
    na, nb = math.sqrt(na2), math.sqrt(nb2)
    if na < eps or nb < eps:
        return {"ca": 1 - w, "cb": w}
    theta = math.acos(max(-1.0, min(1.0, dot / (na * nb))))
    if abs(theta) < 1e-4:
        return {"ca": 1 - w, "cb": w}
    s = math.sin(theta)
    return {"ca": math.sin((1 - w) * theta) / s, "cb": math.sin(w * theta) / s}


@register_merge_method("slerp", "spherical interpolation per tensor, weight w",
                       options=("eps",), per_tensor=slerp_coefficients)
def slerp(a: Any, b: Any, w: float, base: Any, *, ca: float, cb: float) -> Any:
    return ca * a + cb * b


@register_merge_method("task-arithmetic", "base + (A − base) + w·(B − base)",
                       weight_range=None, takes_base=True)
def task_arithmetic(a: Any, b: Any, w: float, base: Any) -> Any:
    return base + (a - base) + w * (b - base)


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
    TransportKind("imatrix", _T + "imatrix:transport_imatrix",
                  "llama.cpp importance matrix (llama-imatrix GGUF) of a GGUF model",
                  options=("model",)),
    TransportKind("clt", _T + "clt:transport_clt",
                  "circuit-tracer cross-layer transcoder or per-layer transcoder set"),
)


def transport_kind(name: str) -> TransportKind:
    if name not in TRANSPORT_KINDS:
        raise GaugefixError(f"unknown kind {name!r}; choose from {', '.join(TRANSPORT_KINDS)}")
    return TRANSPORT_KINDS[name]


def merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise GaugefixError(f"unknown merge method {name!r}; choose from "
                            f"{', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def _check_declared(entry: TransportKind | MergeMethod, options: Iterable[str],
                    table: Mapping[str, TransportKind | MergeMethod], what: str) -> None:
    wrong = [o for o in options if o not in entry.options]
    if wrong:
        where = {o: [k.name for k in table.values() if o in k.options] for o in wrong}
        raise GaugefixError("; ".join(
            f"--{o} goes with the {_listed(where[o]) or 'no'} {what}"
            f"{'s' if len(where[o]) != 1 else ''}, not {entry.name}" for o in wrong))


def check_options(kind: TransportKind, options: dict[str, Any]) -> None:
    """Each option goes with the kinds that declare it; every misplaced one named at once."""
    _check_declared(kind, options, TRANSPORT_KINDS, "kind")


def check_merge_options(method: MergeMethod, options: Mapping[str, Any]) -> None:
    """Each merge option goes with the methods that declare it (every misplaced one named
    at once)."""
    _check_declared(method, options, MERGE_METHODS, "method")


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


def base_help() -> str:
    """Which methods take a base, as the merge command's --base help says it."""
    names = [m.name for m in MERGE_METHODS.values() if m.takes_base]
    return f"{' and '.join(names) or 'no method'}: the common base, in A's chart"


# what each kind's option means to it: the CLI's help for --model and --family comes from here
OPTION_HELP: dict[tuple[str, str], str] = {
    ("lora", "model"): "the base checkpoint (for its family)",
    ("lora", "family"): "the base model's family",
    ("optim", "model"): "the checkpoint a bare optimizer.pt belongs to",
    ("imatrix", "model"): "the GGUF file the importance matrix was computed for",
}


def _listed(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def option_help(option: str) -> str:
    """The help of a transport option: what it means to each kind that declares it."""
    return "; ".join(f"{k.name}: {OPTION_HELP.get((k.name, option), option)}"
                     for k in TRANSPORT_KINDS.values() if option in k.options)
