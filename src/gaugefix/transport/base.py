"""Declarative tensor tables over the single primitive, shared by every format adapter.

A format adapter says, for each tensor name, which residual axes it has and
whether it is signed; :func:`transport_tensors` then applies ``SignedPerm.apply``
through :class:`~gaugefix.arch.Op`. Nothing here permutes or flips by itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..arch import Op
from ..errors import GaugefixError
from ..group import SignedPerm
from ..shards import Move

H0, H1, H2 = Op("H", 0), Op("H", 1), Op("H", 2)
GAIN = Op("G")  # unsigned gather on axis 0
UNTOUCHED: tuple[Op, ...] = ()


@dataclass(frozen=True)
class TensorRule:
    """Tensors whose name fully matches ``pattern`` take ``ops`` (in sequence)."""

    pattern: str
    ops: tuple[Op, ...]

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


def rules(table: Sequence[tuple[str, tuple[Op, ...]]]) -> tuple[TensorRule, ...]:
    return tuple(TensorRule(p, ops) for p, ops in table)


def ops_for(name: str, table: Sequence[TensorRule], what: str) -> tuple[Op, ...]:
    hits = [r for r in table if r.matches(name)]
    if len(hits) != 1:
        reason = "matches no rule" if not hits else "matches several rules"
        raise GaugefixError(f"{what}: tensor {name!r} {reason}; unknown layout")
    return hits[0].ops


def move(tensor: Any, ops: Sequence[Op], gauge: SignedPerm, *, unsigned: bool = False) -> Any:
    """Apply each op in turn (e.g. both axes of a skip matrix)."""
    for op in ops:
        tensor = op(gauge, tensor, signed=False if unsigned else None)
    return tensor


def transport_tensors(tensors: Mapping[str, Any], table: Sequence[TensorRule],
                      gauge: SignedPerm, what: str) -> dict[str, Any]:
    """Every tensor moved by its rule; an unknown name is an error naming it."""
    plan = {k: ops_for(k, table, what) for k in tensors}
    return {k: move(v, plan[k], gauge).contiguous() if plan[k] else v
            for k, v in tensors.items()}


def table_moves(layout: Any, plan: Mapping[str, tuple[Op, ...]], gauge: SignedPerm,
                what: str) -> dict[str, Any]:
    """The streaming rewrite's moves (:func:`gaugefix.shards.rewrite`) for a planned table:
    one residual axis moves in blocks; several (a skip matrix) move the whole tensor."""
    moves: dict[str, Any] = {}
    for e in layout.entries:
        ops = plan[e.name]
        axes = [op.residual_axis for op in ops if op.residual_axis is not None]
        for op, axis in zip(ops, axes, strict=False):
            if axis >= len(e.shape) or e.shape[axis] != gauge.d:
                raise GaugefixError(f"width mismatch: {what} tensor {e.name} has shape "
                                    f"{list(e.shape)}, expected {gauge.d} on axis {axis} ({op})")
        if not axes:
            moves[e.name] = None
        elif len(ops) == 1:
            axis = axes[0] if axes[0] >= 0 else axes[0] + len(e.shape)
            signed = ops[0].signed
            moves[e.name] = Move(gauge, axis, signed)
        else:  # several residual axes (a skip matrix): the whole tensor, op after op
            moves[e.name] = Move(gauge, 0, whole=lambda t, ops=ops: move(t, ops, gauge))
    return moves


def transport_record(gauge: SignedPerm, inverse: bool, gauge_file: str | None) -> dict[str, Any]:
    """What a transported object records about the gauge it was moved with."""
    return {"tool": "gaugefix", "gauge_file": gauge_file, "direction": "B->A" if inverse
            else "A->B", "d": gauge.d, "perm": gauge.perm.tolist(),
            "sign": gauge.sign.astype(int).tolist()}
