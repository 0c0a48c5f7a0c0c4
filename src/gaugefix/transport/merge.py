"""Coordinate-preserving merges: put B into A's chart, then merge tensor by tensor.

``gauge`` maps A's chart to B's (as ``match A B`` writes it), so B is moved by its
inverse. Methods come from :data:`gaugefix.registry.MERGE_METHODS`, each with its own
elementwise implementation, weight range and base: ``linear`` ((1−w)·A + w·B), ``slerp``
(per tensor, weight w) and ``task-arithmetic`` (base + (A − base) + w·(B − base), with the
base in A's chart). The result is a loadable HF checkpoint with A's config, tokenizer and
layout.

Streamed: A's shards go through the streaming engine (:func:`gaugefix.shards.stream`) into
a merge sink, which reads B and the base by offset at each block's elements, so memory
stays at a few blocks whatever the checkpoint's size (slerp reads each tensor twice: norms
and dot product, then the blend). A merge whose arithmetic overflows (a huge weight, or a
result beyond A's dtype) is refused, naming the tensor: nothing is written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from ..apply import plan_checkpoint, write_gauged_weights
from ..checkpoint import Checkpoint
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_dir, copy_files, no_bar, transaction
from ..model import Model, ModelLike, open_model
from ..registry import MERGE_METHODS, MergeMethod, check_merge_options, merge_method
from ..shards import Block, ElementReader, Entry, Layout, Sink, element_blocks, stream, torch_dtype


def check_weight(method: str, weight: float) -> None:
    if not math.isfinite(weight):
        raise GaugefixError(f"merge weight must be a finite number, got {weight}")
    lo_hi = merge_method(method).weight_range
    if lo_hi is not None and not lo_hi[0] <= weight <= lo_hi[1]:
        free = [m.name for m in MERGE_METHODS.values() if m.weight_range is None]
        raise GaugefixError(f"a {method} merge weight must lie in {lo_hi[0]:g}..{lo_hi[1]:g}, "
                            f"got {weight} ({' and '.join(free)} takes any scale)")


def check_merge(method: str, weight: float, *, aligned: bool, base: object | None,
                export_aligned: object | None, options: Mapping[str, Any] | None = None
                ) -> MergeMethod:
    """A merge's arguments against its method's registry entry (an unknown method, a
    weight out of its range, a base it does not take or lacks, an option it does not
    declare) and each other (an export without a gauge): the first problem, as one error."""
    m = merge_method(method)
    check_weight(method, weight)
    if m.takes_base and base is None:
        raise GaugefixError(f"{method} needs --base (the common base, in A's chart)")
    if not m.takes_base and base is not None:
        takes = [x.name for x in MERGE_METHODS.values() if x.takes_base]
        raise GaugefixError(f"{method} takes no base (--base goes with "
                            f"{' and '.join(takes) or 'no method'}), got {base}")
    if export_aligned is not None and not aligned:
        raise GaugefixError(f"nothing to export to {export_aligned}: an unaligned merge "
                            "moves no B into A's chart (--export-aligned needs a gauge)")
    check_merge_options(m, options or {})
    return m


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


def merge_checkpoints(model_a: ModelLike, model_b: ModelLike, gauge: SignedPerm | None,
                      out: str | Path, *, method: str = "linear", weight: float = 0.5,
                      base: ModelLike | None = None, export_aligned: str | Path | None = None,
                      overwrite: bool = False, progress: bool = False,
                      options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge A with B (moved into A's chart by ``gauge``⁻¹; ``None`` = no alignment).

    Everything is checked before anything is written (the method, its weight, base and
    ``options`` against its registry entry, families, widths, the gauge, every tensor's
    name and shape), and the merge and ``export_aligned`` appear together or not at all
    (also when the arithmetic overflows, found while merging).
    """
    m = check_merge(method, weight, aligned=gauge is not None, base=base,
                    export_aligned=export_aligned, options=options)
    models = [open_model(x) for x in (model_a, model_b, base) if x is not None]
    if any(x.quantised for x in models):
        return _merge_dequantised(models, gauge, out, m, weight, dict(options or {}),
                                  export_aligned=export_aligned, overwrite=overwrite,
                                  progress=progress)
    if models[0].checkpoint is not None and not models[0].checkpoint.is_safetensors:
        raise GaugefixError("merge writes safetensors; model A must be a safetensors checkpoint")
    ca, cb, *rest = [_on_disk(m) for m in models]
    cbase = rest[0] if rest else None
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
        b = ElementReader([Path(b_dir) / s.name for s in cb.shards])
        cbase_reader = ElementReader(cbase.shards) if cbase is not None else None
        n = 0
        try:
            for shard in tqdm(ca.shards, desc="merging", unit="shard",
                              disable=no_bar(progress)):
                sink = MergeSink(tmp / shard.name, m, weight, b, cbase_reader, shard,
                                 dict(options or {}))
                n += len(stream(shard, {}, sink).entries)
        finally:
            for r in (b, cbase_reader):
                if r is not None:
                    r.close()
        if gauge is not None and export_aligned is None:
            shutil.rmtree(tmp / ".aligned-B")
    return {"tensors": n, "method": method, "weight": weight, "aligned": gauge is not None}


def _merge_dequantised(models: list[Model], gauge: SignedPerm | None, out: str | Path,
                       method: MergeMethod, weight: float, options: dict[str, Any], *,
                       export_aligned: str | Path | None, overwrite: bool, progress: bool
                       ) -> dict[str, Any]:
    """A merge with a quantised input (GGUF, a HF quantised format): merging codes is not
    merging weights, so every tensor is read dequantised (float32, as transformers loads it),
    B and the base moved into A's chart, merged by the method in float64, and the result
    written as a float32 Hugging Face checkpoint with A's config (transformers'
    ``save_pretrained`` of A's dequantised module): quantise it with the format's own tool.
    Memory: the dequantised model A. ``export_aligned``: B moved into A's chart, written
    in B's own format (moved exactly where its layout allows: see ``apply``)."""
    from ..apply import gauge_checkpoint

    a, b, *rest = [x.check() for x in models]
    base_m = rest[0] if rest else None
    for x in (b, base_m):
        if x is not None and (x.family.name, x.hidden_size) != (a.family.name, a.hidden_size):
            raise GaugefixError(f"cannot merge: {x.name} is {x.family.name} d={x.hidden_size}, "
                                f"{a.name} is {a.family.name} d={a.hidden_size}")
    if gauge is not None:
        a.family.check_gauge(gauge, a.hidden_size)
    problems = [f"{x.name}: {k}" for x in (b, base_m) if x is not None
                for k, shape in a.shapes.items() if x.shapes.get(k) != shape]
    if problems:
        raise GaugefixError(f"cannot merge: tensors missing or of other shapes in "
                            f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}")
    back = gauge.inverse() if gauge is not None else None
    inputs = [x.path for x in (a, b, base_m) if x is not None and x.path is not None]
    module = _float_module(a)
    params = module.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for key in tqdm(sorted(a.plan), desc="merging", unit="tensor", disable=no_bar(progress)):
        op = a.plan[key]
        ta = a.tensor(key).double()
        tb = b.tensor(key).double() if back is None else op(back, b.tensor(key)).double()
        tbase = None
        if base_m is not None:  # the base is in A's chart (as for float checkpoints)
            tbase = base_m.tensor(key).double()
        # the methods work on flat element blocks (as the streamed merge hands them)
        flat = (ta.reshape(-1), tb.reshape(-1), None if tbase is None else tbase.reshape(-1))
        extra = (method.per_tensor([flat], weight, **options)
                 if method.per_tensor is not None else options)
        result = method.combine(*flat[:2], weight, flat[2], **extra).reshape(ta.shape)
        if not torch.isfinite(result).all():
            raise GaugefixError(f"merge overflows in {key}: nothing written")
        merged[key] = result.to(torch.float32)
    missing = sorted(set(params) - set(merged) - {"lm_head.weight"})
    if missing:
        raise GaugefixError(f"cannot merge: {a.name}'s module has tensors its file lacks "
                            f"({', '.join(missing[:5])})")
    with transaction(inputs), atomic_dir(out, overwrite=overwrite) as tmp:
        if export_aligned is not None and back is not None:
            gauge_checkpoint(b, export_aligned, back, overwrite=overwrite, progress=progress)
        module.load_state_dict(merged, strict=False)
        module.tie_weights()
        module.save_pretrained(tmp)
    return {"tensors": len(merged), "method": method.name, "weight": weight,
            "aligned": gauge is not None, "dequantised": True}


def _float_module(a: Model) -> torch.nn.Module:
    """The float32 module A's config describes, built by transformers from the config alone
    (its quantisation dropped): the merge fills every tensor, and a quantised A is never
    loaded through transformers' quantised loading (which needs the format's kernel library:
    optimum for GPTQ, autoawq for AWQ, a GPU for some)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in a.config.items() if k != "quantization_config"}
    try:
        config = AutoConfig.for_model(**cfg)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    except (ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().split("\n", 1)[0]
        raise GaugefixError(f"{a.name}: transformers cannot build the model its config "
                            f"describes ({first})") from None


def _on_disk(m: Model) -> Checkpoint:
    if m.checkpoint is None:
        raise GaugefixError(f"{m.name} is a model in memory; merge reads checkpoints on disk "
                            "(save_pretrained it first)")
    m.check()
    return m.checkpoint


class MergeSink(Sink):
    """A's blocks (untouched: A is in its own chart) merged with B's (and the base's) at
    the same elements, by the method's own implementation, on float64 blocks cast to A's
    dtype, written to ``dst`` under A's header and in A's layout. Non-float tensors and any
    bytes between tensors are A's. A non-finite value the inputs did not have (an overflow)
    is refused, naming the tensor, the element and the weight."""

    def __init__(self, dst: Path, method: MergeMethod, weight: float, b: ElementReader,
                 base: ElementReader | None, shard: Path,
                 options: Mapping[str, Any] | None = None) -> None:
        self.dst, self.method, self.w, self.b, self.base = dst, method, weight, b, base
        self.shard = shard
        self.options = dict(options or {})
        self.extra: dict[str, Any] = {}

    def open(self, layout: Layout, source: BinaryIO) -> None:
        self._f: BinaryIO = open(self.dst, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(layout.header)

    def take(self, block: Block, src: memoryview, out: memoryview
             ) -> list[concurrent.futures.Future[Any]]:
        e = block.entry
        dtype = torch_dtype(e.dtype, str(self.shard)) if e is not None else None
        if e is None or dtype is None or not dtype.is_floating_point:
            self._f.write(out)
            return []
        start, count = block.elements
        if start == 0:  # the tensor's first block: its first pass, for a method with one
            self.extra = self._per_tensor(e) if self.method.per_tensor is not None \
                else self.options
        a = torch.frombuffer(bytearray(out), dtype=dtype).double()
        xb = self.b.read(e.name, start, count).double()
        xbase = None if self.base is None else self.base.read(e.name, start, count).double()
        merged = self.method.combine(a, xb, self.w, xbase, **self.extra).to(dtype)
        bad = ~torch.isfinite(merged)
        if bool(bad.any()):
            self._refuse(e, start, bad, a, xb, xbase)
        self._f.write(merged.view(torch.uint8).numpy())
        return []

    def _per_tensor(self, e: Entry) -> dict[str, Any]:
        a = ElementReader([self.shard])
        try:
            def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
                for start, count in element_blocks(e):
                    yield (a.read(e.name, start, count).double(),
                           self.b.read(e.name, start, count).double(),
                           None if self.base is None else
                           self.base.read(e.name, start, count).double())

            assert self.method.per_tensor is not None
            return self.method.per_tensor(blocks(), self.w, **self.options)
        finally:
            a.close()

    def _refuse(self, e: Entry, start: int, bad: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, base: torch.Tensor | None) -> None:
        new = bad & torch.isfinite(a) & torch.isfinite(b)
        if base is not None:
            new &= torch.isfinite(base)
        if not bool(new.any()):
            return  # non-finite where an input already was: carried, not made
        i = int(new.nonzero()[0])
        at = ", ".join(f"{n}={float(x[i]):g}" for n, x in (("A", a), ("B", b), ("base", base))
                       if x is not None)
        raise GaugefixError(f"a {self.method.name} merge with weight {self.w:g} overflows: "
                            f"{e.name} gets a non-finite value (element {start + i}: {at}; "
                            f"{e.dtype}); nothing written")

    def close(self, ok: bool) -> None:
        self._f.close()


@contextlib.contextmanager
def _scratch_dir(path: Path) -> Iterator[Path]:
    path.mkdir()
    yield path
