"""Coordinate-preserving merges: put B into A's chart, then merge tensor by tensor.

``gauge`` maps A's chart to B's (as ``match A B`` writes it), so B is moved by its
inverse. Methods: ``linear`` ((1−w)·A + w·B), ``slerp`` (per tensor, weight w) and
``task-arithmetic`` (base + (A − base) + w·(B − base), with the base in A's chart).
The result is a loadable HF checkpoint with A's config, tokenizer and layout.

Streamed: each tensor is merged in element blocks (slerp in two passes: norms and dot
product, then the blend), reading B and the base by offset, so memory stays at a few blocks
whatever the checkpoint's size.
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
from ..io import atomic_dir, copy_files, no_bar, transaction
from ..registry import MERGE_METHODS, merge_method
from ..shards import ElementReader, Entry, element_blocks, read_layout, torch_dtype


def check_weight(method: str, weight: float) -> None:
    if not math.isfinite(weight):
        raise GaugefixError(f"merge weight must be a finite number, got {weight}")
    lo_hi = merge_method(method).weight_range
    if lo_hi is not None and not lo_hi[0] <= weight <= lo_hi[1]:
        free = [m.name for m in MERGE_METHODS.values() if m.weight_range is None]
        raise GaugefixError(f"a {method} merge weight must lie in {lo_hi[0]:g}..{lo_hi[1]:g}, "
                            f"got {weight} ({' and '.join(free)} takes any scale)")


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
    check_weight(method, weight)
    if merge_method(method).needs_base and base is None:
        raise GaugefixError(f"{method} needs --base (the common base, in A's chart)")
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
        copy_files(ca.path, tmp, {s.name for s in ca.shards})  # the shard index too
        readers = [ElementReader(Checkpoint.open(b_dir).shards)]
        if cbase is not None:
            readers.append(ElementReader(cbase.shards))
        n = 0
        try:
            for shard in tqdm(ca.shards, desc="merging", unit="shard",
                              disable=no_bar(progress)):
                n += _merge_shard(shard, tmp / shard.name, method, weight, *readers)
        finally:
            for r in readers:
                r.close()
        if gauge is not None and export_aligned is None:
            shutil.rmtree(tmp / ".aligned-B")
    return {"tensors": n, "method": method, "weight": weight, "aligned": gauge is not None}


def _merge_shard(shard: Path, dst: Path, method: str, w: float, b: ElementReader,
                 base: ElementReader | None = None) -> int:
    """One shard of A merged with B (and the base), tensor by tensor in element blocks; the
    output keeps A's header and layout. Non-float tensors are A's."""
    layout = read_layout(shard)
    a = ElementReader([shard])
    try:
        with open(dst, "wb") as fo:
            fo.write(layout.header)
            pos = len(layout.header)
            for e in layout.entries:
                if e.begin != pos:
                    raise GaugefixError(f"{shard}: bytes between tensors; not a safetensors "
                                        "file written by safetensors")
                dtype = torch_dtype(e.dtype, str(shard))
                coef = _slerp_coefficients(e, a, b, w) if method == "slerp" else None
                for start, count in element_blocks(e):
                    xa = a.read(e.name, start, count)
                    if not dtype.is_floating_point:
                        out = xa
                    elif coef is not None:
                        out = coef[0] * xa.double() + coef[1] * b.read(e.name, start,
                                                                       count).double()
                    else:
                        xb = b.read(e.name, start, count).double()
                        xbase = None if base is None else base.read(e.name, start, count)
                        out = _elementwise(xa.double(), xb, method, w, xbase)
                    fo.write(out.to(dtype).view(torch.uint8).numpy())
                pos = e.end
    finally:
        a.close()
    return len(layout.entries)


def _elementwise(a: torch.Tensor, b: torch.Tensor, method: str, w: float,
                 base: torch.Tensor | None) -> torch.Tensor:
    """linear ((1−w)·A + w·B) and task-arithmetic (base + (A − base) + w·(B − base)), on
    float64 blocks, cast to A's dtype by the caller."""
    if method == "linear":
        return (1 - w) * a + w * b
    assert base is not None
    base = base.double()
    return base + (a - base) + w * (b - base)


def _slerp_coefficients(e: Entry, a: ElementReader, b: ElementReader, w: float,
                        eps: float = 1e-8) -> tuple[float, float]:
    """slerp's weights on A and B for one tensor, from norms and dot product accumulated
    over blocks (a first pass; the blend is the second)."""
    na2 = nb2 = dot = 0.0
    for start, count in element_blocks(e):
        xa, xb = a.read(e.name, start, count).double(), b.read(e.name, start, count).double()
        na2, nb2, dot = na2 + float(xa @ xa), nb2 + float(xb @ xb), dot + float(xa @ xb)
    na, nb = math.sqrt(na2), math.sqrt(nb2)
    if na < eps or nb < eps:
        return 1 - w, w
    theta = math.acos(max(-1.0, min(1.0, dot / (na * nb))))
    if abs(theta) < 1e-4:
        return 1 - w, w
    s = math.sin(theta)
    return math.sin((1 - w) * theta) / s, math.sin(w * theta) / s


@contextlib.contextmanager
def _scratch_dir(path: Path) -> Iterator[Path]:
    path.mkdir()
    yield path
