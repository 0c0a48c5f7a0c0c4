"""Declarative tensor tables over the single primitive, shared by every format adapter.

A format adapter says, for each tensor name, which residual axes it has and
whether it is signed; :func:`transport_tensors` then applies ``SignedPerm.apply``
through :class:`~gaugefix.arch.Op`. Nothing here permutes or flips by itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch import Op, Rule, check_dtype, check_width, plan_rules
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_dir, copy_files
from ..shards import Layout, Move, move_of, read_layout, rewrite

H0, H1, H2 = Op("H", 0), Op("H", 1), Op("H", 2)
GAIN = Op("G")  # unsigned gather on axis 0
UNTOUCHED: tuple[Op, ...] = ()


def rules(table: Sequence[tuple[str, tuple[Op, ...]]]) -> tuple[Rule, ...]:
    """A format's table: each (whole-name pattern, ops) as a :class:`~gaugefix.arch.Rule`."""
    return tuple(Rule.full(p, *ops) for p, ops in table)


def plan_names(names: Iterable[str], table: Sequence[Rule], what: str, *,
               required: Mapping[str, str] | None = None, where: object = ""
               ) -> dict[str, tuple[Op, ...]]:
    """Each name's ops. Every name that matches no rule (or several) and every ``required``
    tensor (label: pattern) that is missing is named in one error (the same planning as a
    checkpoint's, :func:`gaugefix.arch.plan_rules`)."""
    return plan_rules(names, lambda n: [(r.pattern, r.ops) for r in table if r.matches(n)],
                      what, required=required, where=where, tail="unknown layout")


def move(tensor: Any, ops: Sequence[Op], gauge: SignedPerm, *, unsigned: bool = False) -> Any:
    """Apply each op in turn (e.g. both axes of a skip matrix)."""
    for op in ops:
        tensor = op(gauge, tensor, signed=False if unsigned else None)
    return tensor


def transport_tensors(tensors: Mapping[str, Any], table: Sequence[Rule],
                      gauge: SignedPerm, what: str) -> dict[str, Any]:
    """Every tensor moved by its rule; an unknown name is an error naming it."""
    plan = plan_names(tensors, table, what)
    return {k: move(v, plan[k], gauge).contiguous() if plan[k] else v
            for k, v in tensors.items()}


def table_moves(layout: Any, plan: Mapping[str, tuple[Op, ...]], gauge: SignedPerm,
                what: str) -> dict[str, Any]:
    """The streaming rewrite's moves (:func:`gaugefix.shards.rewrite`) for a planned table:
    one residual axis moves in blocks; several (a skip matrix) move the whole tensor. Every
    width and dtype is checked first (no integer tensor on a signed axis)."""
    moves: dict[str, Any] = {}
    for e in layout.entries:
        ops = plan[e.name]
        check_width(e.name, e.shape, ops, gauge.d, what)
        check_dtype(e.name, e.dtype, ops, gauge, what)
        active = [op for op in ops if op.axes]
        if len(active) <= 1:  # one op: blocks along its axis, or whole for a residual map
            moves[e.name] = move_of(active[0], gauge, len(e.shape)) if active else None
        else:  # several residual axes (a skip matrix): the whole tensor, op after op
            moves[e.name] = Move(gauge, 0, whole=lambda t, ops=ops: move(t, ops, gauge))
    return moves


@dataclass(frozen=True)
class Planned:
    """One safetensors file of a folder with its tensors' moves planned (nothing read but the
    header): :func:`write_folder` streams it through :func:`gaugefix.shards.rewrite`."""

    layout: Layout
    moves: dict[str, Any]


def plan_file(path: Path, table: Sequence[Rule], gauge: SignedPerm, what: str,
              file_what: str, *, required: Mapping[str, str] | None = None) -> Planned:
    """Read a safetensors header and plan every tensor by ``table`` (unknown and missing
    tensors named at once, residual widths checked)."""
    layout = read_layout(path, file_what)
    plan = plan_names((e.name for e in layout.entries), table, what, required=required,
                      where=path.name)
    return Planned(layout, table_moves(layout, plan, gauge, what))


FileWriter = Callable[[Path, Path], None]


def one_layout(src: Path, kind: str, layouts: Mapping[str, Sequence[str]]) -> str | None:
    """The one layout (name: the files of it that ``src`` holds) a folder is in, or None.
    A folder holding two at once is refused naming both: moving one and copying the other
    along unmoved would leave an object that is half in each chart."""
    found = {name: list(files) for name, files in layouts.items() if files}
    if len(found) > 1:
        held = " and ".join(f"{name} ({', '.join(files[:3])}{', …' if len(files) > 3 else ''})"
                            for name, files in found.items())
        raise GaugefixError(f"{kind}: {src} holds two layouts at once, {held}; one would move "
                            "and the other be copied unmoved: keep one layout per folder")
    return next(iter(found), None)


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def check_suffix(dst: Path, writes: str, suffixes: Sequence[str]) -> None:
    """Refuse an output file whose suffix names another format than the one written (a torch
    zip named ``.safetensors``, JSON named ``.csv``): every reader would misread it."""
    if dst.suffix not in suffixes:
        suffix = repr(dst.suffix) if dst.suffix else "(none)"
        raise GaugefixError(f"output {dst}: its suffix {suffix} does not "
                            f"match the format written, {writes} ({', '.join(suffixes)}); the "
                            "output keeps the input's format")


def write_folder(src: Path, dst: Path, files: Mapping[str, Planned | FileWriter], *,
                 record: Mapping[str, Any], overwrite: bool) -> None:
    """The moved folder, published atomically: every other top-level file copied along, each
    planned safetensors file rewritten (the transport recorded in its metadata), each other
    named file written by its writer ``(source file, output file)``."""
    with atomic_dir(dst, overwrite=overwrite, inputs=(src,)) as tmp:
        copy_files(src, tmp, set(files))
        for name, how in files.items():
            if isinstance(how, Planned):
                rewrite(src / name, tmp / name, how.moves,
                        metadata={**how.layout.metadata, "gaugefix": json.dumps(record)})
            else:
                how(src / name, tmp / name)


def no_record(record: Mapping[str, Any], what: str) -> None:
    """Refuse ``--checkpoint`` for an object whose format has no place for metadata: the
    checkpoint it belongs to would be silently not recorded."""
    if "checkpoint" in record:
        raise GaugefixError(f"{what} has no place for metadata, so --checkpoint cannot be "
                            "recorded in it (safetensors and GGUF objects, and folders, record "
                            "it)")


def transport_record(gauge: SignedPerm, inverse: bool, gauge_file: str | None) -> dict[str, Any]:
    """What a transported object records about the gauge it was moved with."""
    return {"tool": "gaugefix", "gauge_file": gauge_file, "direction": "B->A" if inverse
            else "A->B", "d": gauge.d, "perm": gauge.perm.tolist(),
            "sign": gauge.sign.astype(int).tolist()}
