"""A safetensors checkpoint quantised in a Hugging Face format, as a model.

:mod:`.hf` moves one Linear's stored tensors; this module makes a whole checkpoint whose
``config.json`` has a supported ``quantization_config`` look like a float one to every
command (:class:`~gaugefix.model.Model` presents each quantised Linear as one *logical*
``<module>.weight`` of its dequantised [out, in] shape, so the family table plans it
unchanged) and does what apply, fingerprint and verify need on the stored tensors:

* :func:`moves` -- every logical tensor moved under a plan: a quantised group with
  :func:`.hf.move` on each residual axis of its op in turn, any other tensor with its op;
* :func:`write` -- the shards of the moved checkpoint (whole shards in memory: this format
  is small, the quantised tensors are held until written), with a ``gaugefix.record`` in
  each shard's ``__metadata__``;
* :func:`check_moved` -- per logical tensor, what B is of A moved: ``exact``,
  ``requantised`` (B is byte for byte :func:`.hf.move` of A) or ``differs``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GaugefixError
from ..group import SignedPerm
from . import hf
from .gguf_file import RECORD_KEY, TensorMove

if TYPE_CHECKING:
    import torch

    from ..arch import Op
    from ..model import Model


@dataclass(frozen=True)
class HfQuant:
    """A checkpoint's scheme and its quantised groups (logical key -> {role: stored name})."""

    scheme: hf.QuantScheme
    groups: dict[str, dict[str, str]]

    @property
    def name(self) -> str:
        """The scheme as :data:`.hf.CAPABILITIES` names it."""
        return self.scheme.capability_row

    @property
    def stored(self) -> dict[str, str]:
        """Every stored name of a group -> its logical key."""
        return {n: key for key, roles in self.groups.items() for n in roles.values()}


def detect(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
           dtypes: Callable[[], Mapping[str, str]] | None = None,
           read: Callable[[str], torch.Tensor] | None = None) -> HfQuant | None:
    """The checkpoint's quantisation (None: no ``quantization_config``); an unsupported one
    is refused in one line naming it, and so is a group whose stored tensors break the
    layout's schema (:func:`.hf.check_group`: every problem of every group, in one error).
    ``shapes``: every stored tensor's shape; ``dtypes``: their safetensors dtype names."""
    names = list(shapes)
    scheme = hf.detect_scheme(config, names)
    if scheme is None:
        return None
    groups = hf.group_tensors(scheme, names)
    if not groups:
        raise GaugefixError(f"{scheme.method}: quantization_config names it but no tensor "
                            f"has its layout ({', '.join(scheme.roles.values())})")
    kinds = dtypes() if dtypes is not None else {}
    problems = _incomplete(scheme, names, groups, kinds)
    for key, roles in groups.items():
        problems += hf.check_group(scheme, key, {r: shapes[n] for r, n in roles.items()},
                                   {r: kinds[n] for r, n in roles.items() if n in kinds})
    if not problems and read is not None:
        for key, roles in groups.items():
            problems += hf.check_values(scheme, key, read, roles, shapes)
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise GaugefixError(f"{scheme.method}: the stored tensors break the layout: "
                            + "; ".join(problems[:4]) + more)
    return HfQuant(scheme, groups)


def _incomplete(scheme: hf.QuantScheme, names: list[str], groups: Mapping[str, Any],
                kinds: Mapping[str, str]) -> list[str]:
    """Modules that hold some of the layout's tensors but not all it needs (a scale gone):
    their data would be read as a float weight. For FP8, whose data role is a plain
    ``weight``, a float8 weight without its scale."""
    roles = scheme.roles
    data = str(hf.FORMATS[scheme.layout]["data"])
    required = [r for r in roles if r not in hf.FORMATS[scheme.layout]["optional"]]
    found: dict[str, set[str]] = {}
    for name in names:
        module, _, suffix = name.rpartition(".")
        role = next((r for r, sfx in roles.items() if sfx == suffix), None)
        if role is not None:
            found.setdefault(module, set()).add(role)
    out = []
    for module, have in sorted(found.items()):
        if f"{module}.weight" in groups:
            continue
        if have == {data} and roles[data] == "weight" and not kinds.get(
                f"{module}.weight", "").startswith("F8"):
            continue  # a float Linear beside FP8 ones
        lacking = [roles[r] for r in required if r not in have]
        out.append(f"{module} lacks {', '.join(lacking)} (it holds "
                   f"{', '.join(sorted(roles[r] for r in have))})")
    return out


def group_of(model: Model, key: str) -> dict[str, torch.Tensor]:
    """The stored tensors (by stored name) of the logical ``key``."""
    q = model.hf_quant
    assert q is not None
    return {n: model.stored_tensor(n) for n in q.groups[key].values()}


def move_group(q: HfQuant, key: str, tensors: Mapping[str, Any], op: Op, gauge: SignedPerm
               ) -> tuple[dict[str, Any], TensorMove, dict[str, Any]]:
    """One quantised group moved by ``op``: each residual axis in turn (the op's signs,
    its blocks tiled). (moved stored tensors, record, quantization_config changes)."""
    if op.residual_axis is None:
        return dict(tensors), TensorMove(key, q.name, "untouched"), {}
    if op.kind not in ("H", "HH"):
        raise GaugefixError(f"{q.scheme.method}: {key}: a quantised Linear cannot take op "
                            f"{op} (only H and HH)")
    g = gauge.tiled(op.blocks)
    out, how, errors, rts, change = dict(tensors), "exact", [], [], {}
    for axis in op.axes:
        m = hf.move(q.scheme, out, g, axis, signed=op.signed)
        out = m.tensors
        change.update(m.config_change)
        if m.how == "requantised":
            how = "requantised"
            errors.append(m.error or 0.0)
            rts.append(m.round_trip_error or 0.0)
    rec = TensorMove(key, q.name, how, max(errors) if errors else None,
                     max(rts) if rts else None)
    return out, rec, change


def moves(model: Model, plan: Mapping[str, Op], gauge: SignedPerm
          ) -> Iterator[tuple[str, dict[str, Any], TensorMove, dict[str, Any]]]:
    """(logical key, moved stored tensors by name, record, config changes) for every logical
    tensor, in key order."""
    q = model.hf_quant
    assert q is not None
    for key in sorted(plan):
        op = plan[key]
        if key in q.groups:
            yield (key, *move_group(q, key, group_of(model, key), op, gauge))
        else:
            t = model.stored_tensor(key)
            how = "untouched" if op.residual_axis is None else "exact"
            yield key, {key: op(gauge, t).contiguous()}, TensorMove(key, str(t.dtype), how), {}


def write(model: Model, out_dir: Path, plan: Mapping[str, Op], gauge: SignedPerm,
          record: Mapping[str, Any]) -> tuple[list[TensorMove], dict[str, Any], int]:
    """The moved checkpoint's shards (same names, dtypes, shard layout, index copied by the
    caller) into ``out_dir``: every tensor moved first and held (whole shards in memory is
    what this format allows), then each shard saved with ``safetensors`` and its original
    ``__metadata__`` plus ``gaugefix.record`` (``record``, the exact count and the
    requantised tensors). (records, quantization_config changes, bytes written)."""
    from safetensors.torch import save_file

    from ..io import open_safetensors

    ck = model.checkpoint
    assert ck is not None
    moved: dict[str, Any] = {}
    records: list[TensorMove] = []
    change: dict[str, Any] = {}
    for _, tensors, rec, ch in moves(model, plan, gauge):
        moved.update(tensors)
        records.append(rec)
        change.update(ch)
    doc = {**record, "exact": sum(r.how == "exact" for r in records),
           "requantised": [r.to_dict() for r in records if r.how == "requantised"]}
    written = 0
    for shard in ck.shards:
        with open_safetensors(shard, "weight shard") as f:
            names = list(f.keys())
            meta = dict(f.metadata() or {})
        meta[RECORD_KEY] = json.dumps(doc, sort_keys=True)
        dst = out_dir / shard.name
        save_file({n: moved.pop(n).contiguous() for n in names}, str(dst), metadata=meta)
        written += dst.stat().st_size
    return records, change, written


def read_record(path: Path) -> dict[str, Any] | None:
    """The ``gaugefix.record`` of a shard written by :func:`write` (None: none)."""
    from ..io import open_safetensors

    with open_safetensors(path, "weight shard") as f:
        raw = (f.metadata() or {}).get(RECORD_KEY)
    return None if raw is None else json.loads(raw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    den = float(torch.linalg.norm(b.double()))
    return float(torch.linalg.norm((a - b).double())) / den if den else 0.0


def check_moved(a: Model, b: Model, gauge: SignedPerm) -> list[TensorMove]:
    """Per logical tensor of A, what B is of it moved by ``gauge``: ``exact`` (B's values,
    dequantised, are A's moved, bit for bit), ``requantised`` (not, but B's stored tensors
    are byte for byte what :func:`.hf.move` makes of A's: ``error`` is what that costs) or
    ``differs``."""
    import torch

    qa, qb = a.hf_quant, b.hf_quant
    assert qa is not None and qb is not None
    plan, out = a.plan, []
    for key in sorted(plan):
        op = plan[key]
        typ = qa.name if key in qa.groups else str(a.shapes[key])
        if key not in b.shapes or b.shapes[key] != a.shapes[key] or (
                (key in qa.groups) != (key in qb.groups)):
            out.append(TensorMove(key, typ, "differs"))
            continue
        target = op(gauge, a.tensor(key))
        got = b.tensor(key)
        if got.dtype == target.dtype and torch.equal(got, target):
            out.append(TensorMove(key, typ, "exact"))
            continue
        if key in qa.groups:
            new, rec, _ = move_group(qa, key, group_of(a, key), op, gauge)
            stored = group_of(b, key)
            same = set(stored) == set(new) and all(
                stored[n].dtype == new[n].dtype and torch.equal(stored[n], new[n])
                for n in new)
            if same:
                out.append(TensorMove(key, typ, "requantised", _rel(got.float(), target),
                                      rec.round_trip))
                continue
        out.append(TensorMove(key, typ, "differs",
                              _rel(got.float(), target.float()) if got.shape == target.shape
                              else None))
    return out


class QuantLibraryMissing(GaugefixError):
    """transformers cannot load the checkpoint here: its format's kernel library is not
    installed (the tensors can still be read, moved and checked)."""


def load(model: Model, dtype: torch.dtype, **options: Any) -> torch.nn.Module:
    """The module through transformers' own quantised loading; a missing kernel library
    (optimum/gptqmodel for GPTQ, autoawq for AWQ, a GPU for some) as
    :class:`QuantLibraryMissing`, one line."""
    from ..loading import load_causal_lm

    q = model.hf_quant
    assert q is not None and model.path is not None
    try:
        return load_causal_lm(model.path, dtype, **options)
    except ImportError as exc:
        first = str(exc).strip().split("\n", 1)[0]
        raise QuantLibraryMissing(f"{model.name}: transformers cannot run {q.scheme.method} "
                                  f"here ({first}); compared tensor by tensor only") from None
    except (GaugefixError, RuntimeError, ValueError) as exc:
        msg = str(exc)
        if any(w in msg.lower() for w in ("install", "requires", "no gpu", "gpu is",
                                          "cuda", "not available")):
            first = msg.strip().split("\n", 1)[0]
            raise QuantLibraryMissing(f"{model.name}: transformers cannot run "
                                      f"{q.scheme.method} here ({first}); compared tensor by "
                                      "tensor only") from None
        raise
