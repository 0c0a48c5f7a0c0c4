"""Crosscoders: encoders reading several residual streams (layers, or models) into shared latents.

Each *slot* (a model, or a layer) has its own residual axis, moved by its own chart's gauge:
``gauge`` is one :class:`SignedPerm` for every slot (the layers of one model, or two models
moved by the same gauge) or a sequence with one entry per slot, ``None`` for a slot whose
chart is unchanged (e.g. ``[None, g]``: model A stays, model B moves by ``g``).

Layouts (the output keeps the input's file names and kind: an output file whose suffix names
another format is refused, and so is a folder holding both layouts):

* **ckkissane** (crosscoder-model-diff-replication): a folder with ``cc_weights.pt`` (a torch
  state dict, + ``cfg.json``), or such a ``.pt`` file. ``W_enc`` [m, d, F], ``W_dec``
  [F, m, d], ``b_enc`` [F], ``b_dec`` [m, d]; encode ``relu(Σ_m x[m] @ W_enc[m] + b_enc)``,
  decode ``x̂[m] = f @ W_dec[:, m] + b_dec[m]``.
* **dictionary_learning** (science-of-finetuning fork, ``CrossCoder``): a hub folder with
  ``model.safetensors`` (+ ``config.json``), or a ``.pt`` / ``.safetensors`` state dict
  (``_orig_mod.`` prefixes allowed). ``encoder.weight`` [m, d, F], ``decoder.weight``
  [m, F, d] (slot-major, unlike ckkissane), ``decoder.bias`` [m, d], ``activation_mean``
  [m, d] (signed), ``activation_std`` [m, d] (unsigned: a scale), latent and per-slot
  scalars untouched.

The per-model scalar normalisations (ckkissane's √d / mean‖x‖, not saved) are sign-safe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import Op, Rule, check_dtype
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_file, load_safetensors, torch_load
from ..shards import Move, read_layout
from .base import (
    GAIN,
    H0,
    H1,
    TORCH_SUFFIXES,
    UNTOUCHED,
    Planned,
    check_suffix,
    check_width,
    move,
    one_layout,
    plan_names,
    rules,
    write_folder,
)

Gauges = SignedPerm | Sequence[SignedPerm | None]


@dataclass(frozen=True)
class SlotLayout:
    """A crosscoder layout: each tensor's ops on one slot's slice, and its slot axis."""

    name: str
    table: tuple[Rule, ...]
    slot_axis: dict[str, int]  # rule pattern -> slot axis (absent: no slot axis)
    marker: str  # a tensor name only this layout has

    def slot(self, name: str) -> int | None:
        rule = next(r for r in self.table if r.matches(name))
        return self.slot_axis.get(rule.pattern)


CKKISSANE = SlotLayout("ckkissane", rules([
    ("W_enc", (H0,)),  # [m, d, F]: slice [d, F]
    ("W_dec", (H1,)),  # [F, m, d]: slice [F, d]
    ("b_dec", (H0,)),  # [m, d]
    ("b_enc", UNTOUCHED),
]), {"W_enc": 0, "W_dec": 1, "b_dec": 0}, "W_enc")
DICTIONARY_LEARNING = SlotLayout("dictionary_learning", rules([
    (r"encoder\.weight", (H0,)),  # [m, d, F]
    (r"decoder\.weight", (H1,)),  # [m, F, d]
    (r"decoder\.bias|activation_mean", (H0,)),  # [m, d]
    ("activation_std", (GAIN,)),  # [m, d], a scale: gathered only
    (r"encoder\.bias|activation_global_scale|target_rms|code_normalization_id|k|threshold",
     UNTOUCHED),
]), {r"encoder\.weight": 0, r"decoder\.weight": 0, r"decoder\.bias|activation_mean": 0,
     "activation_std": 0}, "encoder.weight")
LAYOUTS = (CKKISSANE, DICTIONARY_LEARNING)
PREFIX = "_orig_mod."  # torch.compile's, stripped by dictionary_learning's loader


def _bare(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _layout(names: Sequence[str], where: Path) -> SlotLayout:
    bare = {_bare(n) for n in names}
    for lay in LAYOUTS:
        if lay.marker in bare:
            return lay
    raise GaugefixError(f"crosscoder: {where} has neither W_enc (ckkissane) nor encoder.weight "
                        "(dictionary_learning); unknown layout")


def slot_gauges(gauge: Gauges, m: int, where: str) -> list[SignedPerm | None]:
    """One gauge (or None: unchanged) per slot."""
    if isinstance(gauge, SignedPerm):
        return [gauge] * m
    slots = list(gauge)
    if len(slots) != m:
        raise GaugefixError(f"crosscoder: {where} has {m} slots, got {len(slots)} gauges (one "
                            "per slot, None for a slot that does not move)")
    return slots


def move_slots(t: torch.Tensor, ops: Sequence[Op], axis: int | None,
               gauges: Sequence[SignedPerm | None]) -> torch.Tensor:
    """Each slot's slice (along ``axis``) moved by its own gauge through the primitive."""
    if axis is None:
        raise GaugefixError("internal error: a moved crosscoder tensor without a slot axis")
    out = t.clone()
    for s, g in enumerate(gauges):
        if g is not None:
            out.select(axis, s).copy_(move(t.select(axis, s).contiguous(), ops, g))
    return out


@dataclass(frozen=True)
class Plan:
    layout: SlotLayout
    ops: dict[str, tuple[Op, ...]]
    slots: dict[str, int | None]
    gauges: list[SignedPerm | None]


def plan_tensors(shapes: dict[str, tuple[int, ...]], gauge: Gauges, where: Path,
                 dtypes: dict[str, Any] | None = None) -> Plan:
    """Every tensor's ops and slot axis, the gauges per slot, every width (and dtype: no
    integer tensor on a signed axis) checked."""
    lay = _layout(list(shapes), where)
    what = f"crosscoder ({lay.name})"
    bare = {n: _bare(n) for n in shapes}
    ops = plan_names(bare.values(), lay.table, what, where=where.name)
    slots = {n: lay.slot(b) for n, b in bare.items()}
    marker = next(n for n, b in bare.items() if b == lay.marker)
    axis = slots[marker] or 0
    if len(shapes[marker]) <= axis:
        raise GaugefixError(f"crosscoder: tensor {marker} has shape {list(shapes[marker])}, "
                            f"expected its slots on axis {axis} (in {where.name})")
    m = shapes[marker][axis]
    gauges = slot_gauges(gauge, m, str(where))
    for n, b in bare.items():
        shape, axis = shapes[n], slots[n]
        if not ops[b]:
            continue
        for g in gauges:
            if g is not None and dtypes is not None:
                check_dtype(n, dtypes[n], ops[b], g, what)
        if axis is None or len(shape) <= axis or shape[axis] != m:
            raise GaugefixError(f"crosscoder: tensor {n} has shape {list(shape)}, expected {m} "
                                f"slots on axis {axis}")
        piece = shape[:axis] + shape[axis + 1:]
        for g in gauges:
            if g is not None:
                check_width(n, piece, ops[b], g.d, what)
    return Plan(lay, {n: ops[b] for n, b in bare.items()}, slots, gauges)


def _moves(plan: Plan) -> dict[str, Move | None]:
    """The streaming rewrite's moves: each moved tensor whole, slot by slot."""
    anchor = next((g for g in plan.gauges if g is not None), None)
    out: dict[str, Move | None] = {}
    for n, ops in plan.ops.items():
        if not ops or anchor is None:
            out[n] = None
            continue
        out[n] = Move(anchor, 0, whole=lambda t, ops=ops, ax=plan.slots[n]:
                      move_slots(t, ops, ax, plan.gauges))
    return out


def _move_pt(state: Any, gauge: Gauges, where: Path) -> tuple[dict[str, Any], Plan]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise GaugefixError(f"crosscoder: {where} is not a state dict of tensors")
    plan = plan_tensors({k: tuple(v.shape) for k, v in state.items()}, gauge, where,
                        {k: v.dtype for k, v in state.items()})
    return {k: move_slots(v, plan.ops[k], plan.slots[k], plan.gauges) if plan.ops[k] else v
            for k, v in state.items()}, plan


def transport_crosscoder(src: str | Path, dst: str | Path, gauge: Gauges, *,
                         record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Move a crosscoder (folder or state-dict file) into the other charts, written to
    ``dst``; ``gauge``: one for every slot, or one per slot (None: unchanged)."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        held = one_layout(src, "crosscoder", {
            layout: [name] if (src / name).is_file() else []
            for layout, name in (("ckkissane", "cc_weights.pt"),
                                 ("dictionary_learning", "model.safetensors"))})
        if held == "ckkissane":
            name = "cc_weights.pt"
            moved, plan = _move_pt(torch_load(src / name, "crosscoder state dict"), gauge, src)

            def write_pt(_s: Path, d: Path) -> None:
                torch.save(moved, d)

            write_folder(src, dst, {name: write_pt}, record=record, overwrite=overwrite)
        elif held == "dictionary_learning":
            name = "model.safetensors"
            layout = read_layout(src / name, "crosscoder weights file")
            plan = plan_tensors({e.name: e.shape for e in layout.entries}, gauge, src / name,
                                {e.name: e.dtype for e in layout.entries})
            write_folder(src, dst, {name: Planned(layout, _moves(plan))}, record=record,
                         overwrite=overwrite)
        else:
            raise GaugefixError(f"crosscoder: {src} has neither cc_weights.pt (ckkissane) nor "
                                "model.safetensors (dictionary_learning); unknown layout")
    elif src.suffix in (".pt", ".pth"):
        check_suffix(dst, "a torch state dict", TORCH_SUFFIXES)
        moved, plan = _move_pt(torch_load(src, "crosscoder state dict"), gauge, src)
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp:
            torch.save(moved, tmp)
    elif src.suffix == ".safetensors":
        from safetensors.torch import save_file

        check_suffix(dst, "a safetensors file", (".safetensors",))
        tensors, meta = load_safetensors(src, "crosscoder weights file")
        plan = plan_tensors({k: tuple(v.shape) for k, v in tensors.items()}, gauge, src,
                            {k: v.dtype for k, v in tensors.items()})
        out = {k: move_slots(v, plan.ops[k], plan.slots[k], plan.gauges).contiguous()
               if plan.ops[k] else v for k, v in tensors.items()}
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp:
            save_file(out, str(tmp), metadata={**meta, "gaugefix": json.dumps(record)})
    else:
        raise GaugefixError(f"crosscoder: {src} is neither a crosscoder folder nor a .pt or "
                            ".safetensors state dict")
    return {"layout": plan.layout.name, "slots": len(plan.gauges),
            "moved slots": sum(g is not None for g in plan.gauges), "tensors": len(plan.ops)}
