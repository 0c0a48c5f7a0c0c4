"""Architecture map: which tensor of a checkpoint touches the residual stream, and how.

Families are data (``families.json``, validated on load by :class:`FamilyTable`); this
module compiles them into rules and turns a list of tensor names into a *plan*: for each
name, the one :class:`Op` that moves it from chart A to chart B. Every op is a call of
``SignedPerm.apply`` — there is no other transform in gaugefix.

Norms are behaviours, not type names: a norm says whether it subtracts the mean (then
per-coordinate signs do not commute with it and the group is S_d×{±1}), whether it has a
gain and a bias, and what it adds to its stored gain (Gemma's ``1 + w``). Model types whose
residual stream admits no signed-permutation gauge are listed with the reason, and refused
with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GaugefixError
from ..group import SignedPerm

OpKind = Literal["H", "HH", "G", "LB", "-"]
LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass(frozen=True)
class Op:
    """How one tensor transforms: H(axis), HH (a map from the residual stream to itself:
    d on axes 0 and 1, moved on both), G, LB, or untouched (``-``)."""

    kind: OpKind
    axis: int | None = None
    blocks: int = 1  # >1: the axis holds that many residual streams side by side ([h, e])

    def __post_init__(self) -> None:
        if self.kind not in ("H", "HH", "G", "LB", "-"):
            raise GaugefixError(f"unknown op {self.kind!r}")
        if self.blocks < 1 or (self.blocks > 1 and self.kind not in ("H", "G")):
            raise GaugefixError(f"op {self.kind} cannot have {self.blocks} blocks")
        if (self.kind == "H") != (self.axis is not None):
            need = "needs" if self.kind == "H" else "takes no"
            raise GaugefixError(f"op {self.kind} {need} axis")

    @property
    def residual_axis(self) -> int | None:
        """The (first) axis carrying the hidden dimension, or None for untouched tensors."""
        return {"H": self.axis, "HH": 0, "G": 0, "LB": 0, "-": None}[self.kind]

    @property
    def axes(self) -> tuple[int, ...]:
        """Every axis carrying the hidden dimension."""
        if self.kind == "HH":
            return (0, 1)
        return () if self.residual_axis is None else (self.residual_axis,)

    @property
    def one_stream(self) -> bool:
        """One residual axis of width d: slices along it move as whole coordinates (what
        canonical charts and weight evidence read; a residual map or a concatenation of
        streams is only carried along)."""
        return len(self.axes) == 1 and self.blocks == 1

    @property
    def signed(self) -> bool:
        return self.kind in ("H", "HH", "LB")

    def __call__(self, gauge: SignedPerm, tensor: Any, *, signed: bool | None = None) -> Any:
        """Transport ``tensor``; ``signed=False`` forces the unsigned version (second moments)."""
        sign = self.signed if signed is None else signed and self.signed
        gauge = gauge.tiled(self.blocks)
        for axis in self.axes:
            tensor = gauge.apply(tensor, axis, sign)
        return tensor

    def __str__(self) -> str:
        name = f"H({self.axis})" if self.kind == "H" else self.kind
        return name if self.blocks == 1 else f"{name}×{self.blocks}"


def check_width(name: str, shape: Sequence[int], ops: Iterable[Op], d: int,
                what: str = "") -> None:
    """Every residual axis of ``ops`` has width ``d``: the one width check, for checkpoints
    and objects alike, made before anything is written (an error naming the tensor)."""
    for op in ops:
        for axis in op.axes:
            if not (-len(shape) <= axis < len(shape) and shape[axis] == d * op.blocks):
                raise GaugefixError(f"width mismatch: {what + ' tensor ' if what else ''}{name} "
                                    f"has shape {list(shape)}, expected {d * op.blocks} on axis "
                                    f"{axis} ({op})")


# safetensors' names for integer dtypes (torch and numpy spell them int8, uint8, bool, ...)
_ST_INTEGER = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
_INTEGER = re.compile(r"q?u?int\d*(x\d+)?|bool_?")  # torch's quantised qint8/quint4x2 too


def dtype_name(dtype: Any) -> str:
    """A torch, numpy or safetensors dtype as one name: ``int8``, ``float16``, ``bool``."""
    name = str(dtype).removeprefix("torch.")
    return _ST_INTEGER.get(name, name)


def is_integer_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` (torch, numpy or safetensors) holds integers (or booleans)."""
    return _INTEGER.fullmatch(dtype_name(dtype)) is not None


def check_dtype(name: str, dtype: Any, ops: Iterable[Op], gauge: SignedPerm | None = None,
                what: str = "") -> None:
    """Refuse an integer tensor on a signed residual axis: int8/uint8 weights are quantised
    values whose negation wraps around (-(-128) = -128, uint8 has no negatives) and whose
    meaning depends on a scale and zero point stored elsewhere, so flipping their sign is not
    exact. Permuting them is, so a gauge without negative signs (``gauge`` given) passes.
    Made at planning, before anything is written, for checkpoints and objects alike."""
    if not is_integer_dtype(dtype) or not any(op.signed and op.axes for op in ops):
        return
    if gauge is not None and bool((gauge.sign > 0).all()):
        return
    where = f"{what} " if what else ""
    raise GaugefixError(f"{where}integer tensor {name} ({dtype_name(dtype)}) lies on a signed "
                        "residual axis; negating it is not exact without its quantisation "
                        "scheme (dequantise it first, or use a gauge without sign flips)")


# ---------------------------------------------------------------------------------------------
# The table's schema (validated on load; every problem reported at once)

class Norm(BaseModel):
    """What a residual norm does, as far as the gauge is concerned."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str
    mean_subtracting: bool = Field(description="subtracts the mean over d (LayerNorm): only "
                                   "permutations and one global sign commute with it")
    gain: bool = Field(True, description="has a per-channel gain (moved by G)")
    bias: bool = Field(False, description="has a per-channel bias (moved by LB)")
    gain_offset: float = Field(0.0, description="added to the stored gain (Gemma: 1 + w)")


class FamilySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model_types: list[str] = Field(min_length=1)
    norm: str
    rule_sets: list[str] = Field(min_length=1)
    layers: str = Field(description="module path of the decoder-layer list")
    conv1d: bool = Field(False, description="linear weights stored [in, out] (GPT-2 Conv1D)")
    towers: list[str] = Field(default_factory=list, description="modules of a multimodal "
                              "checkpoint outside the text model (vision or audio towers): "
                              "their tensors never touch the residual stream and stay as "
                              "they are, whatever rule their names would match")


class Refusal(BaseModel):
    """A model type whose residual stream admits no signed-permutation gauge: why, and the
    rules that plan its tensors (the coverage sweep shows a gauge applied by them changes the
    function, so the reason is checked, not only stated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: str
    norm: str
    rule_sets: list[str] = Field(min_length=1)
    layers: str = "model.layers"


# [suffix, op, axis] or [suffix, op, axis, blocks]
RuleSpec = tuple[str, OpKind, int | None] | tuple[str, OpKind, int | None, int]


class FamilyTable(BaseModel):
    """``families.json``: rule sets, norm behaviours, families, refused model types."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    comment: list[str] = Field(default_factory=list, alias="_comment")
    norms: dict[str, Norm]
    rule_sets: dict[str, list[RuleSpec]]
    families: dict[str, FamilySpec]
    refused: dict[str, Refusal] = Field(default_factory=dict,
                                        description="model type -> why no gauge exists")

def _cross_check(doc: Mapping[str, Any]) -> list[str]:
    """References between the table's parts, checked on the raw document so that they are
    reported together with the field errors (unknown norms and rule sets, bad regexes,
    a model type in two families, LB or G rules a norm cannot have, dead rule sets)."""
    def section(name: str) -> dict[str, Any]:
        value = doc.get(name)
        return value if isinstance(value, dict) else {}

    norms, rule_sets = section("norms"), section("rule_sets")
    problems: list[str] = []
    for name, rules in rule_sets.items():
        for rule in rules if isinstance(rules, list) else []:
            if not (isinstance(rule, list) and len(rule) in (3, 4) and isinstance(rule[0], str)):
                continue  # a field error
            suffix, kind, axis = rule[:3]
            try:
                re.compile(suffix)
            except re.error as exc:
                problems.append(f"rule set {name!r}: {suffix!r} is not a regex ({exc})")
            if isinstance(axis, int) and not isinstance(axis, bool) and axis < 0:
                problems.append(f"rule set {name!r}: {suffix!r}: axis {axis} (count from 0)")
            if (kind == "H") != (axis is not None):
                problems.append(f"rule set {name!r}: {suffix!r}: op {kind} "
                                f"{'needs' if kind == 'H' else 'takes no'} axis")
    used: set[str] = set()
    owner: dict[str, str] = {}
    specs = [(f"family {n!r}", n, f) for n, f in section("families").items()]
    specs += [(f"refusal {t!r}", None, r) for t, r in section("refused").items()]
    for what, name, fam in specs:
        if not isinstance(fam, dict):
            continue
        norm_name = fam.get("norm")
        if isinstance(norm_name, str) and norm_name not in norms:
            problems.append(f"{what}: unknown norm {norm_name!r} (known: "
                            f"{', '.join(sorted(norms))})")
        sets = [x for x in fam.get("rule_sets") or [] if isinstance(x, str)]
        for x in sets:
            used.add(x)
            if x not in rule_sets:
                problems.append(f"{what}: unknown rule set {x!r}")
        norm = norms.get(norm_name) if isinstance(norm_name, str) else None
        kinds = {r[1] for x in sets for r in rule_sets.get(x) or []
                 if isinstance(r, list) and len(r) in (3, 4)}
        if isinstance(norm, dict) and "LB" in kinds and not norm.get("bias", False):
            problems.append(f"{what}: its rules move a norm bias (LB) but norm {norm_name!r} "
                            "has no bias")
        if isinstance(norm, dict) and "G" in kinds and not norm.get("gain", True):
            problems.append(f"{what}: its rules move a norm gain (G) but norm {norm_name!r} "
                            "has no gain")
        for tower in fam.get("towers") or []:
            try:
                re.compile(tower)
            except re.error as exc:
                problems.append(f"{what}: tower {tower!r} is not a regex ({exc})")
        if name is None:
            continue
        for t in fam.get("model_types") or []:
            if t in owner:
                problems.append(f"model type {t!r} is in families {owner[t]!r} and {name!r}")
            owner[t] = name
    for t in section("refused"):
        if t in owner:
            problems.append(f"model type {t!r} is both refused and in family {owner[t]!r}")
    unused = sorted(set(rule_sets) - used)
    if unused:
        problems.append(f"rule sets used by no family: {', '.join(unused)}")
    return problems


def validate_table(doc: Mapping[str, Any], where: str = "families.json") -> FamilyTable:
    """The table, validated: field errors (pydantic) and cross-references, every problem in
    one :class:`GaugefixError`."""
    problems: list[str] = []
    tab = None
    try:
        tab = FamilyTable.model_validate(doc)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    problems += _cross_check(doc)
    if problems or tab is None:
        raise GaugefixError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems))
    return tab


@cache
def table() -> FamilyTable:
    """The shipped table (package data, found through importlib.resources)."""
    text = resources.files(__package__).joinpath("families.json").read_text()
    return validate_table(json.loads(text))


# ---------------------------------------------------------------------------------------------
# Compiled families


@dataclass(frozen=True)
class Rule:
    """The one rule dialect, for checkpoints and objects alike: tensors whose name matches
    ``pattern`` take ``ops``, in sequence (one for a checkpoint's tensors; several for an
    object's skip matrix, residual on both axes). A family's rules match a name's end at a
    ``.`` boundary (prefixes differ between in-memory, on-disk and PEFT names); a format's
    tables match whole names."""

    pattern: str
    ops: tuple[Op, ...]
    regex: re.Pattern[str]

    @classmethod
    def suffix(cls, pattern: str, *ops: Op) -> Rule:
        return cls(pattern, ops, re.compile(rf"(?:^|\.){pattern}$"))

    @classmethod
    def full(cls, pattern: str, *ops: Op) -> Rule:
        return cls(pattern, ops, re.compile(rf"^(?:{pattern})\Z"))

    def matches(self, name: str) -> bool:
        return self.regex.search(name) is not None

    @property
    def op(self) -> Op:
        """The single op of a checkpoint rule."""
        if len(self.ops) != 1:
            raise GaugefixError(f"rule {self.pattern!r} has {len(self.ops)} ops, not one")
        return self.ops[0]


def collapse_layers(key: str) -> str:
    """``model.layers.3.mlp.w`` → ``model.layers.{i}.mlp.w`` (one line per repeated key)."""
    return LAYER_INDEX.sub("{i}", key)


def _summarise(keys: Iterable[str], limit: int = 12) -> str:
    """The keys, one per layer-collapsed name (the key itself when it occurs once)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(collapse_layers(k), []).append(k)
    names = [c if len(ks) > 1 else ks[0] for c, ks in groups.items()]
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


T = TypeVar("T")


def plan_rules(names: Iterable[str], hits: Callable[[str], Sequence[tuple[str, T]]], what: str,
               *, of: str = "", required: Mapping[str, str] | None = None, where: object = "",
               tail: str = "refusing to guess their residual axis") -> dict[str, T]:
    """Each name's rule value, for checkpoints (a family's rules) and objects (a format's
    table) alike: ``hits(name)`` gives the (label, value) of every rule the name matches.
    Names no rule matches, names several rules match and ``required`` tensors (label: full
    pattern) that are missing are all named in one error, layer numbers collapsed."""
    names = list(names)
    out: dict[str, T] = {}
    unmatched: list[str] = []
    several: list[str] = []
    for k in names:
        found = hits(k)
        if len(found) == 1:
            out[k] = found[0][1]
        elif not found:
            unmatched.append(k)
        else:
            several.append(f"{collapse_layers(k)} ({', '.join(label for label, _ in found)})")
    missing = [label for label, pattern in (required or {}).items()
               if not any(re.fullmatch(pattern, n) for n in names)]
    if unmatched or several or missing:
        parts = []
        if unmatched:
            n = len(dict.fromkeys(map(collapse_layers, unmatched)))
            parts.append(f"{n} tensor name(s) match no rule{of}: {_summarise(unmatched)}")
        if several:
            parts.append(f"tensors matching several rules: {'; '.join(dict.fromkeys(several))}")
        if missing:
            parts.append(f"required tensor(s) missing: {', '.join(missing)}")
        at = f" (in {where})" if where else ""
        raise GaugefixError(f"{what}: {'; '.join(parts)}{at}; {tail}")
    return out


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    norm: str
    norm_spec: Norm
    rules: tuple[Rule, ...]
    layers: str = "model.layers"
    conv1d: bool = False
    towers: re.Pattern[str] | None = None

    def in_tower(self, key: str) -> bool:
        """Whether ``key`` belongs to a vision/audio tower (untouched)."""
        return self.towers is not None and self.towers.search(key) is not None

    @property
    def allows_signs(self) -> bool:
        """Whether per-coordinate signs preserve the function (no mean subtraction)."""
        return not self.norm_spec.mean_subtracting

    @property
    def gauge_group(self) -> str:
        """The gauge group among signed permutations for generic gains."""
        return "B_d" if self.allows_signs else "S_d×{±1}"

    @property
    def gain_offset(self) -> float:
        return self.norm_spec.gain_offset

    @property
    def norm_description(self) -> str:
        return self.norm_spec.description

    def match(self, key: str) -> list[Rule]:
        return [r for r in self.rules if r.matches(key)]

    def op_for(self, key: str) -> Op:
        return self.plan([key])[key]

    def role(self, weight_key: str) -> str:
        """'reader' or 'writer' of the residual stream for a linear module's weight, from
        its name (never its shape); 'other' when it does not touch the stream."""
        op = self.op_for(weight_key)
        if op.kind == "HH":
            return "residual map"  # reads and writes the stream: no reader/writer table
        if op.kind != "H" or op.axis not in (0, 1):
            return "other"
        reads_on = 0 if self.conv1d else 1
        return "reader" if op.axis == reads_on else "writer"

    def plan(self, keys: Iterable[str]) -> dict[str, Op]:
        """The op of every key. Keys no rule matches, or several do, are reported all at
        once (layer numbers collapsed to ``{i}``), never guessed; a tower's keys are
        untouched."""
        keys = list(keys)
        out = {k: Op("-") for k in keys if self.in_tower(k)}
        out.update(plan_rules((k for k in keys if k not in out),
                              lambda k: [(r.pattern, r.op) for r in self.match(k)], self.name,
                              of=" of the architecture map"))
        return out

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


def _compile_rule(suffix: str, kind: OpKind, axis: int | None, blocks: int = 1) -> Rule:
    return Rule.suffix(suffix, Op(kind, axis, blocks))


def _compile(tab: FamilyTable, name: str, spec: FamilySpec | Refusal,
             model_types: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        norm=spec.norm,
        norm_spec=tab.norms[spec.norm],
        rules=tuple(_compile_rule(*r) for s in spec.rule_sets for r in tab.rule_sets[s]),
        layers=spec.layers,
        conv1d=getattr(spec, "conv1d", False),
        towers=re.compile(rf"(?:^|\.)(?:{'|'.join(towers)})\.") if (
            towers := getattr(spec, "towers", [])) else None,
    )


def compile_families(tab: FamilyTable) -> dict[str, Family]:
    return {name: _compile(tab, name, spec, tuple(spec.model_types))
            for name, spec in tab.families.items()}


def refused_rules(model_type: str) -> Family:
    """The rules that plan a refused model type's tensors (for the sweep's check only:
    gaugefix never applies them)."""
    tab = table()
    return _compile(tab, f"refused:{model_type}", tab.refused[model_type], (model_type,))


@cache
def families() -> dict[str, Family]:
    """All supported families, compiled from ``families.json``."""
    return compile_families(table())


def refusal(model_type: str | None) -> str | None:
    """Why ``model_type``'s residual stream admits no signed-permutation gauge, if it does not."""
    spec = table().refused.get(model_type or "")
    return None if spec is None else spec.reason


def _refuse(model_type: str) -> None:
    why = refusal(model_type)
    if why is not None:
        raise GaugefixError(f"model_type {model_type!r} admits no residual gauge: {why}")


def get_family(name: str) -> Family:
    fams = families()
    if name in fams:
        return fams[name]
    for fam in fams.values():
        if name in fam.model_types:
            return fam
    _refuse(name)
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
    if isinstance(model_type, str):
        _refuse(model_type)
    supported = ", ".join(sorted(families()))
    what = f"model_type {model_type!r}" if model_type else "no model_type"
    if archs:
        what += f" (architectures {archs})"
    raise GaugefixError(f"unsupported family: {what}; supported: {supported}")


def hidden_size_of(config: Mapping[str, Any] | Any) -> int:
    """The residual width: the config's, or its text model's (a multimodal checkpoint)."""
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c.get(key), int) and not isinstance(c.get(key), bool):
                return int(c[key])
    raise GaugefixError("config has no hidden size (hidden_size / n_embd / d_model, nor in "
                        "text_config)")


__all__ = [
    "Family",
    "FamilyTable",
    "Norm",
    "Op",
    "Rule",
    "check_dtype",
    "check_width",
    "collapse_layers",
    "detect_family",
    "dtype_name",
    "families",
    "get_family",
    "hidden_size_of",
    "is_integer_dtype",
    "plan_rules",
    "refusal",
    "refused_rules",
    "table",
    "validate_table",
]
