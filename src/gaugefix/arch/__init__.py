"""Architecture map: which tensor of a checkpoint touches the residual stream, and how.

Families are data (``families.json``); this module compiles them into rules and
turns a list of tensor names into a *plan*: for each name, the one :class:`Op`
that moves it from chart A to chart B. Every op is a call of
``SignedPerm.apply`` — there is no other transform in gaugefix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from ..errors import GaugefixError
from ..group import SignedPerm

OpKind = Literal["H", "G", "LB", "-"]
NormKind = Literal["rmsnorm", "layernorm", "layernorm_noaffine"]


@dataclass(frozen=True)
class Op:
    """How one tensor transforms: H(axis), G, LB, or untouched (``-``)."""

    kind: OpKind
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("H", "G", "LB", "-"):
            raise GaugefixError(f"unknown op {self.kind!r}")
        if (self.kind == "H") != (self.axis is not None):
            need = "needs" if self.kind == "H" else "takes no"
            raise GaugefixError(f"op {self.kind} {need} axis")

    @property
    def residual_axis(self) -> int | None:
        """The axis carrying the hidden dimension, or None for untouched tensors."""
        return {"H": self.axis, "G": 0, "LB": 0, "-": None}[self.kind]

    @property
    def signed(self) -> bool:
        return self.kind in ("H", "LB")

    def __call__(self, gauge: SignedPerm, tensor: Any, *, signed: bool | None = None) -> Any:
        """Transport ``tensor``; ``signed=False`` forces the unsigned version (second moments)."""
        axis = self.residual_axis
        if axis is None:
            return tensor
        return gauge.apply(tensor, axis, self.signed if signed is None else signed and self.signed)

    def __str__(self) -> str:
        return f"H({self.axis})" if self.kind == "H" else self.kind


@dataclass(frozen=True)
class Rule:
    suffix: str
    op: Op
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    norm: NormKind
    rules: tuple[Rule, ...]
    layers: str = "model.layers"
    gain_offset: float = 0.0
    conv1d: bool = False

    @property
    def gauge_group(self) -> str:
        """The gauge group among signed permutations for generic gains."""
        return "B_d" if self.norm == "rmsnorm" else "S_d×{±1}"

    @property
    def allows_signs(self) -> bool:
        """Whether per-coordinate signs preserve the function (RMSNorm) or only a global sign."""
        return self.norm == "rmsnorm"

    def match(self, key: str) -> list[Rule]:
        return [r for r in self.rules if r.regex.search(key)]

    def op_for(self, key: str) -> Op:
        hits = self.match(key)
        if len(hits) == 1:
            return hits[0].op
        if not hits:
            raise GaugefixError(
                f"{self.name}: tensor {key!r} matches no rule of the architecture map; "
                "refusing to guess its residual axis"
            )
        raise GaugefixError(
            f"{self.name}: tensor {key!r} matches several rules "
            f"({', '.join(r.suffix for r in hits)})"
        )

    def role(self, weight_key: str) -> str:
        """'reader' or 'writer' of the residual stream for a linear module's weight, from
        its name (never its shape); 'other' when it does not touch the stream."""
        op = self.op_for(weight_key)
        if op.kind != "H" or op.axis not in (0, 1):
            return "other"
        reads_on = 0 if self.conv1d else 1
        return "reader" if op.axis == reads_on else "writer"

    def plan(self, keys: Iterable[str]) -> dict[str, Op]:
        """The op of every key; an unmatched or ambiguous key is an error naming it."""
        return {k: self.op_for(k) for k in keys}

    def check_gauge(self, gauge: SignedPerm, hidden_size: int | None = None) -> None:
        """Refuse a gauge that cannot preserve this family's function."""
        if hidden_size is not None and gauge.d != hidden_size:
            raise GaugefixError(
                f"width mismatch: the gauge has d={gauge.d}, the {self.name} model has "
                f"hidden size {hidden_size}"
            )
        if not self.allows_signs and gauge.global_sign is None:
            raise GaugefixError(
                f"{self.name} uses {self.norm_description}, whose gauge group is S_d×{{±1}}: "
                "per-coordinate signs would change the function (mean subtraction does not "
                "commute with them); use a permutation with one global sign"
            )

    @property
    def norm_description(self) -> str:
        return {
            "rmsnorm": "RMSNorm with per-channel gains",
            "layernorm": "LayerNorm with affine gain and bias",
            "layernorm_noaffine": "non-parametric LayerNorm (no gain, no bias)",
        }[self.norm]


def _compile_rule(suffix: str, kind: str, axis: int | None) -> Rule:
    return Rule(suffix, Op(kind, axis), re.compile(rf"(?:^|\.){suffix}$"))  # type: ignore[arg-type]


@cache
def families() -> dict[str, Family]:
    """All supported families, compiled from ``families.json``."""
    doc = json.loads(resources.files(__package__).joinpath("families.json").read_text())
    sets = doc["rule_sets"]
    out: dict[str, Family] = {}
    for name, spec in doc["families"].items():
        rules = tuple(_compile_rule(*r) for s in spec["rule_sets"] for r in sets[s])
        out[name] = Family(
            name=name,
            model_types=tuple(spec["model_types"]),
            norm=spec["norm"],
            rules=rules,
            layers=spec["layers"],
            conv1d=bool(spec.get("conv1d", False)),
            gain_offset=float(spec.get("gain_offset", 0.0)),
        )
    return out


def get_family(name: str) -> Family:
    fams = families()
    if name in fams:
        return fams[name]
    for fam in fams.values():
        if name in fam.model_types:
            return fam
    raise GaugefixError(
        f"unsupported family {name!r}; supported: {', '.join(sorted(fams))}"
    )


def detect_family(config: Mapping[str, Any] | Any) -> Family:
    """The family of a model from its ``config.json`` (dict) or a transformers config."""
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(sorted(families()))
    what = f"model_type {model_type!r}" if model_type else "no model_type"
    if archs:
        what += f" (architectures {archs})"
    raise GaugefixError(f"unsupported family: {what}; supported: {supported}")


def hidden_size_of(config: Mapping[str, Any] | Any) -> int:
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    raise GaugefixError("config has no hidden size (hidden_size / n_embd / d_model)")


__all__ = [
    "Family",
    "Op",
    "Rule",
    "detect_family",
    "families",
    "get_family",
    "hidden_size_of",
]
