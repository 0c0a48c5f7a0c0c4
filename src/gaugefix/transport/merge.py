"""Coordinate-preserving merges: put B into A's chart, then merge tensor by tensor.

``gauge`` maps A's chart to B's (as ``match A B`` writes it), so B is moved by its
inverse. Methods: ``linear`` ((1−w)·A + w·B), ``slerp`` (per tensor, weight w) and
``task-arithmetic`` (base + (A − base) + w·(B − base), with the base in A's chart).
The result is a loadable HF checkpoint with A's config, tokenizer and layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..apply import gauge_checkpoint
from ..checkpoint import Checkpoint
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_dir, copy_files

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


def merge_checkpoints(model_a: str | Path, model_b: str | Path, gauge: SignedPerm | None,
                      out: str | Path, *, method: str = "linear", weight: float = 0.5,
                      base: str | Path | None = None, export_aligned: str | Path | None = None,
                      overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Merge A with B (moved into A's chart by ``gauge``⁻¹; ``None`` = no alignment)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if method not in MERGE_METHODS:
        raise GaugefixError(f"unknown merge method {method!r}; choose from "
                            f"{', '.join(MERGE_METHODS)}")
    if method == "task-arithmetic" and base is None:
        raise GaugefixError("task-arithmetic needs --base (the common base, in A's chart)")
    ca, cb = Checkpoint.open(model_a), Checkpoint.open(model_b)
    if ca.family.name != cb.family.name:
        raise GaugefixError(f"different families: {ca.family.name} vs {cb.family.name}")
    if ca.hidden_size != cb.hidden_size:
        raise GaugefixError(f"different hidden sizes: {ca.hidden_size} vs {cb.hidden_size}")
    if gauge is not None:
        ca.family.check_gauge(gauge, ca.hidden_size)
    if not ca.is_safetensors:
        raise GaugefixError("merge writes safetensors; model A must be a safetensors checkpoint")
    inputs = tuple(Path(p) for p in (ca.path, cb.path, *(() if base is None else (base,))))

    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        b_dir = cb.path
        if gauge is not None:
            aligned = Path(export_aligned) if export_aligned is not None else tmp / ".aligned-B"
            gauge_checkpoint(cb.path, aligned, gauge.inverse(), overwrite=overwrite,
                             progress=progress)
            b_dir = aligned
        get_b = Checkpoint.open(b_dir).getter()
        get_base = Checkpoint.open(base).getter() if base is not None else None
        copy_files(ca.path, tmp, {s.name for s in ca.shards})  # the shard index too
        n = 0
        for shard in tqdm(ca.shards, desc="merging", unit="shard", disable=not progress):
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata() or {"format": "pt"}
                merged = {k: merge_tensors(f.get_tensor(k), get_b(k), method, weight,
                                           None if get_base is None else get_base(k))
                          for k in f.keys()}  # noqa: SIM118
            save_file(merged, str(tmp / shard.name), metadata=meta)
            n += len(merged)
        if gauge is not None and export_aligned is None:
            shutil.rmtree(tmp / ".aligned-B")
    return {"tensors": n, "method": method, "weight": weight, "aligned": gauge is not None}
