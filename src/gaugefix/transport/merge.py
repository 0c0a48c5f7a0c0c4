"""Coordinate-preserving merges: put B into A's chart, then merge tensor by tensor.

``gauge`` maps A's chart to B's (as ``match A B`` writes it), so B is moved by its
inverse. Methods: ``linear`` ((1−w)·A + w·B), ``slerp`` (per tensor, weight w) and
``task-arithmetic`` (base + (A − base) + w·(B − base), with the base in A's chart).
The result is a loadable HF checkpoint with A's config, tokenizer and layout.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..apply import plan_checkpoint, write_gauged_weights
from ..checkpoint import Checkpoint
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_dir, copy_files, no_bar, open_safetensors, transaction

MERGE_METHODS = ("linear", "slerp", "task-arithmetic")


def slerp(a: torch.Tensor, b: torch.Tensor, w: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors viewed as vectors (linear when nearly parallel)."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a64.norm(), b64.norm()
    if na < eps or nb < eps:
        return ((1 - w) * a64 + w * b64).reshape(a.shape)
    cos = torch.clamp(torch.dot(a64 / na, b64 / nb), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:
        out = (1 - w) * a64 + w * b64
    else:
        s = torch.sin(theta)
        out = (torch.sin((1 - w) * theta) / s) * a64 + (torch.sin(w * theta) / s) * b64
    return out.reshape(a.shape)


def merge_tensors(a: torch.Tensor, b: torch.Tensor, method: str, w: float,
                  base: torch.Tensor | None = None) -> torch.Tensor:
    if a.shape != b.shape:
        raise GaugefixError(f"merge: shapes differ ({list(a.shape)} vs {list(b.shape)})")
    if not a.is_floating_point():
        return a
    if method == "linear":
        out = (1 - w) * a.double() + w * b.double()
    elif method == "slerp":
        out = slerp(a, b, w)
    elif method == "task-arithmetic":
        if base is None:
            raise GaugefixError("task-arithmetic needs --base")
        out = base.double() + (a.double() - base.double()) + w * (b.double() - base.double())
    else:
        raise GaugefixError(f"unknown merge method {method!r}; choose from "
                            f"{', '.join(MERGE_METHODS)}")
    return out.to(a.dtype)


def check_weight(method: str, weight: float) -> None:
    if not math.isfinite(weight):
        raise GaugefixError(f"merge weight must be a finite number, got {weight}")
    if method in ("linear", "slerp") and not 0.0 <= weight <= 1.0:
        raise GaugefixError(f"a {method} merge weight must lie in 0..1, got {weight} "
                            "(task-arithmetic takes any scale)")


def check_same_layout(reference: Checkpoint, others: dict[str, Checkpoint]) -> None:
    """Every tensor of ``reference`` in each other checkpoint, with the same shape; every
    difference listed at once."""
    ref = {k: s for _, k, s in reference.entries()}
    problems = []
    for what, ck in others.items():
        theirs = {k: s for _, k, s in ck.entries()}
        missing, extra = sorted(ref.keys() - theirs.keys()), sorted(theirs.keys() - ref.keys())
        if missing:
            problems.append(f"{what} lacks {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}")
        if extra:
            problems.append(f"{what} has extra {', '.join(extra[:5])}"
                            f"{' ...' if len(extra) > 5 else ''}")
        shapes = [f"{k} {list(theirs[k])} vs {list(ref[k])}" for k in ref
                  if k in theirs and theirs[k] != ref[k]]
        if shapes:
            problems.append(f"{what}'s shapes differ: {'; '.join(shapes[:5])}"
                            f"{' ...' if len(shapes) > 5 else ''}")
    if problems:
        raise GaugefixError(f"cannot merge: {' | '.join(problems)}")


def merge_checkpoints(model_a: str | Path, model_b: str | Path, gauge: SignedPerm | None,
                      out: str | Path, *, method: str = "linear", weight: float = 0.5,
                      base: str | Path | None = None, export_aligned: str | Path | None = None,
                      overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Merge A with B (moved into A's chart by ``gauge``⁻¹; ``None`` = no alignment).

    Everything is checked before anything is written (families, widths, the gauge, the
    weight, every tensor's name and shape), and the merge and ``export_aligned`` appear
    together or not at all.
    """
    from safetensors.torch import save_file

    if method not in MERGE_METHODS:
        raise GaugefixError(f"unknown merge method {method!r}; choose from "
                            f"{', '.join(MERGE_METHODS)}")
    check_weight(method, weight)
    if method == "task-arithmetic" and base is None:
        raise GaugefixError("task-arithmetic needs --base (the common base, in A's chart)")
    ca, cb = Checkpoint.open(model_a), Checkpoint.open(model_b)
    cbase = Checkpoint.open(base) if base is not None else None
    if ca.family.name != cb.family.name:
        raise GaugefixError(f"different families: {ca.family.name} vs {cb.family.name}")
    if ca.hidden_size != cb.hidden_size:
        raise GaugefixError(f"different hidden sizes: {ca.hidden_size} vs {cb.hidden_size}")
    if gauge is not None:
        ca.family.check_gauge(gauge, ca.hidden_size)
    if not ca.is_safetensors:
        raise GaugefixError("merge writes safetensors; model A must be a safetensors checkpoint")
    check_same_layout(ca, {"B": cb, **({"the base": cbase} if cbase is not None else {})})
    inputs = [c.path for c in (ca, cb, cbase) if c is not None]

    with transaction(inputs), atomic_dir(out, overwrite=overwrite) as tmp:
        b_dir = cb.path
        if gauge is not None:
            exported = (atomic_dir(export_aligned, overwrite=overwrite)
                        if export_aligned is not None else _scratch_dir(tmp / ".aligned-B"))
            with exported as aligned:
                plan = plan_checkpoint(cb, gauge.inverse())
                copy_files(cb.path, aligned, cb.weight_files)
                write_gauged_weights(cb, aligned, gauge.inverse(), plan, progress=progress)
            b_dir = aligned  # read from where it was written (published with the merge)
        get_b = Checkpoint.open(b_dir).getter()
        get_base = cbase.getter() if cbase is not None else None
        copy_files(ca.path, tmp, {s.name for s in ca.shards})  # the shard index too
        n = 0
        for shard in tqdm(ca.shards, desc="merging", unit="shard", disable=no_bar(progress)):
            with open_safetensors(shard, "weight shard") as f:
                meta = f.metadata() or {"format": "pt"}
                merged = {k: merge_tensors(f.get_tensor(k), get_b(k), method, weight,
                                           None if get_base is None else get_base(k))
                          for k in f.keys()}  # noqa: SIM118
            save_file(merged, str(tmp / shard.name), metadata=meta)
            n += len(merged)
        if gauge is not None and export_aligned is None:
            shutil.rmtree(tmp / ".aligned-B")
    return {"tensors": n, "method": method, "weight": weight, "aligned": gauge is not None}


@contextlib.contextmanager
def _scratch_dir(path: Path) -> Iterator[Path]:
    path.mkdir()
    yield path
