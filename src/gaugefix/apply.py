"""Gauge action on a model: a state dict, a ``torch.nn.Module`` or a checkpoint directory.

The result computes the same function in chart B (``x_B = Q x_A``); its weights
are a gather and a sign flip of the input's, bit for bit.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch import (
    Family,
    Op,
    check_dtype,
    check_width,
    detect_family,
    get_family,
    hidden_size_of,
)
from .checkpoint import Checkpoint, load_shard
from .errors import GaugefixError
from .group import SignedPerm
from .io import atomic_dir, copy_files, no_bar
from .model import Model, ModelLike, open_model

if TYPE_CHECKING:  # imported where tensors are: a safetensors checkpoint is moved without it
    import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _check_widths(plan: Mapping[str, Op], shapes: Mapping[str, tuple[int, ...]], d: int) -> None:
    for key, op in plan.items():
        check_width(key, shapes[key], (op,), d)


def _check_dtypes(plan: Mapping[str, Op], dtypes: Mapping[str, Any], gauge: SignedPerm) -> None:
    for key, op in plan.items():
        check_dtype(key, dtypes[key], (op,), gauge)


def gauge_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    gauge: SignedPerm,
    family: Family | str,
) -> dict[str, torch.Tensor]:
    """A new state dict in chart B. Tensors sharing storage (tied embeddings) stay shared."""
    fam = get_family(family) if isinstance(family, str) else family
    fam.check_gauge(gauge)
    plan = fam.plan(state_dict)
    _check_widths(plan, {k: tuple(v.shape) for k, v in state_dict.items()}, gauge.d)
    _check_dtypes(plan, {k: v.dtype for k, v in state_dict.items()}, gauge)
    done: dict[Any, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        sk = (_storage_key(tensor), plan[key])
        if sk not in done:
            done[sk] = plan[key](gauge, tensor)
        out[key] = done[sk]
    return out


def gauge_model(model: torch.nn.Module, gauge: SignedPerm, *, inplace: bool = False,
                family: Family | str | None = None) -> torch.nn.Module:
    """Put a transformers model into chart B; returns it (a deep copy unless ``inplace``)."""
    if family is None:
        config = getattr(model, "config", None)
        if config is None:
            raise GaugefixError("model has no .config; pass family= explicitly")
        fam = detect_family(config)
        fam.check_gauge(gauge, hidden_size_of(config))
    else:
        fam = get_family(family) if isinstance(family, str) else family
    target = model if inplace else copy.deepcopy(model)
    sd = target.state_dict(keep_vars=True)
    new = gauge_state_dict({k: v.detach() for k, v in sd.items()}, gauge, fam)
    import torch

    seen: set[Any] = set()
    with torch.no_grad():
        for key, tensor in sd.items():
            sk = _storage_key(tensor)
            if sk in seen:
                continue
            seen.add(sk)
            tensor.copy_(new[key])
    return target


@dataclass
class ApplyReport:
    source: Path
    output: Path
    family: str
    d: int
    n_tensors: int = 0
    n_transformed: int = 0
    n_tower: int = 0  # tensors of vision/audio towers, left as they are
    ops: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    bytes_written: int = 0
    # identities (BLAKE3 of the weight files, as Model.identity computes them), taken while
    # the files stream through when asked for
    source_blake3: str | None = None
    blake3: str | None = None
    # a quantised input (GGUF, HF quantised formats): the tensors that could not move
    # exactly and were requantised, with the error that added (TensorMove.to_dict() rows)
    requantised: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def planned(cls, source: Path, output: Path, family: Family, plan: Mapping[str, Op],
                d: int, *, shards: int) -> ApplyReport:
        """The report of a planned move, before anything is written: the ops' counts."""
        report = cls(source, output, family.name, d, shards=shards, n_tensors=len(plan))
        for op in plan.values():
            report.ops[str(op)] = report.ops.get(str(op), 0) + 1
        report.n_transformed = sum(op.residual_axis is not None for op in plan.values())
        report.n_tower = sum(1 for k in plan if family.in_tower(k))
        return report


def gauge_checkpoint(
    model: ModelLike,
    out: str | Path,
    gauge: SignedPerm,
    *,
    overwrite: bool = False,
    progress: bool = True,
    identities: bool = False,
    record: Mapping[str, Any] | None = None,
) -> ApplyReport:
    """Write checkpoint ``model`` in chart B to ``out``, tensor by tensor, atomically.

    Every key is planned and every residual width checked before anything is
    written; non-weight files (config, tokenizer, generation config, ...) are copied.
    ``identities``: also hash the input's and the output's weight files on the way.
    A GGUF file is written as one GGUF file whose ``gaugefix.record`` field holds ``record``
    (default: the gauge and the source's name) and what moved exactly or was requantised;
    a checkpoint in a HF quantised format (GPTQ, AWQ, compressed-tensors, FP8) as a
    checkpoint whose shards' ``__metadata__`` hold that record (:mod:`.quant.hf_checkpoint`).
    """
    m = open_model(model).check()
    if m.gguf is not None:
        return _gauge_gguf(m, Path(out), gauge, overwrite=overwrite, identities=identities,
                           record=record)
    if m.checkpoint is not None and m.hf_quant is not None:
        return _gauge_hf_quant(m, Path(out), gauge, overwrite=overwrite, identities=identities,
                               record=record)
    if m.checkpoint is None:
        raise GaugefixError(f"{m.name} is a model in memory: gauge_model moves it; "
                            "gauge_checkpoint writes a checkpoint on disk")
    ckpt = m.checkpoint
    ckpt.family.check_gauge(gauge, ckpt.hidden_size)
    plan = plan_checkpoint(ckpt, gauge)
    if ckpt.other_layout:
        import warnings

        from .errors import GaugefixWarning

        warnings.warn(f"{', '.join(p.name for p in ckpt.other_layout)} left out of the output: "
                      f"the {'safetensors' if ckpt.is_safetensors else 'torch'} weights were "
                      "moved, and a copy in the other layout, unmoved, would be another chart",
                      GaugefixWarning, stacklevel=2)
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt.path,)) as tmp:
        copy_files(ckpt.path, tmp, ckpt.weight_files)
        report = write_gauged_weights(ckpt, tmp, gauge, plan, progress=progress,
                                      identities=identities)
    report.output = Path(out)
    return report


def _gauge_gguf(m: Model, out: Path, gauge: SignedPerm, *, overwrite: bool,
                identities: bool, record: Mapping[str, Any] | None) -> ApplyReport:
    """A GGUF file in chart B: one GGUF file, moved exactly where its layout allows and
    requantised (recorded in its ``gaugefix.record`` field) where it does not."""
    from .io import atomic_file, blake3_files

    assert m.gguf is not None
    m.family.check_gauge(gauge, m.hidden_size)
    plan = m.plan
    _check_widths(plan, m.shapes, gauge.d)
    report = ApplyReport.planned(m.gguf.path, out, m.family, plan, gauge.d, shards=1)
    if record is None:
        record = {"gauge": gauge.to_json(), "source": m.gguf.path.name}
    with atomic_file(out, overwrite=overwrite, inputs=(m.gguf.path,)) as tmp:
        moved = m.gguf.write(tmp, plan, gauge, record)
        report.bytes_written = tmp.stat().st_size
        if identities:
            report.source_blake3 = m.identity()["blake3"]
            report.blake3 = blake3_files([tmp])
    report.requantised = [r.to_dict() for r in moved if r.how == "requantised"]
    return report


def _gauge_hf_quant(m: Model, out: Path, gauge: SignedPerm, *, overwrite: bool,
                    identities: bool, record: Mapping[str, Any] | None) -> ApplyReport:
    """A checkpoint in a HF quantised format in chart B: each quantised Linear moved on its
    packed data where exact, its cells requantised with the format's quantiser elsewhere
    (:func:`.quant.hf.move`), every other tensor by its op; the shards are written whole
    (held in memory: see :func:`.quant.hf_checkpoint.write`), the config's
    ``quantization_config`` updated where a move needs it (GPTQ ``desc_act``)."""
    import json

    from .io import blake3_files
    from .quant.hf_checkpoint import write

    ckpt, q = m.checkpoint, m.hf_quant
    assert ckpt is not None and q is not None
    ckpt.family.check_gauge(gauge, ckpt.hidden_size)
    plan = m.plan
    _check_widths(plan, m.shapes, gauge.d)
    # integer tensors of the scheme move with it; any other integer tensor is refused
    dtypes = _dtypes(ckpt)
    _check_dtypes({k: op for k, op in plan.items() if k not in q.groups}, dtypes, gauge)
    report = ApplyReport.planned(ckpt.path, out, m.family, plan, gauge.d,
                                 shards=len(ckpt.shards))
    if record is None:
        record = {"gauge": gauge.to_json(), "source": ckpt.path.name}
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt.path,)) as tmp:
        copy_files(ckpt.path, tmp, ckpt.weight_files)
        if ckpt.index_file is not None:
            shutil.copy2(ckpt.index_file, tmp / ckpt.index_file.name)
        moved, change, report.bytes_written = write(m, tmp, plan, gauge, record)
        if change:
            config = json.loads((ckpt.path / "config.json").read_text())
            config["quantization_config"] = {**config["quantization_config"], **change}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if identities:
            report.source_blake3 = m.identity()["blake3"]
            report.blake3 = blake3_files([tmp / s.name for s in ckpt.shards])
    report.requantised = [r.to_dict() for r in moved if r.how == "requantised"]
    return report


def plan_checkpoint(ckpt: Checkpoint, gauge: SignedPerm) -> dict[str, Op]:
    """Every key's op, with every residual width and dtype checked (no integer tensor on a
    signed axis), before anything is written."""
    entries = list(ckpt.entries())
    plan = ckpt.family.plan(k for _, k, _ in entries)
    _check_widths(plan, {k: s for _, k, s in entries}, gauge.d)
    _check_dtypes(plan, _dtypes(ckpt), gauge)
    return plan


def _dtypes(ckpt: Checkpoint) -> dict[str, Any]:
    """Every tensor's dtype: from the safetensors headers, or a torch shard's tensors."""
    from .shards import read_layout

    out: dict[str, Any] = {}
    for shard in ckpt.shards:
        if shard.suffix == ".safetensors":
            out.update((e.name, e.dtype) for e in read_layout(shard).entries)
        else:
            out.update((k, t.dtype) for k, t in load_shard(shard).items())
    return out


def write_gauged_weights(ckpt: Checkpoint, out_dir: Path, gauge: SignedPerm,
                         plan: Mapping[str, Op], *, progress: bool = True,
                         identities: bool = False) -> ApplyReport:
    """The weight shards (and shard index) of ``ckpt`` in chart B, into ``out_dir``:
    safetensors streamed tensor by tensor (:mod:`gaugefix.shards`), torch files whole."""
    from .shards import Hashes, gauge_moves, read_layout, rewrite

    report = ApplyReport.planned(ckpt.path, out_dir, ckpt.family, plan, gauge.d,
                                 shards=len(ckpt.shards))
    if ckpt.index_file is not None:
        shutil.copy2(ckpt.index_file, out_dir / ckpt.index_file.name)
    hashes = Hashes(identities, identities)  # one stream over the shards, in order
    shards: Iterable[Path] = ckpt.shards
    if no_bar(progress) is None:  # tqdm is 15% of this command's start-up: only if it shows
        from tqdm.auto import tqdm

        shards = tqdm(ckpt.shards, desc="applying gauge", unit="shard", disable=None)
    try:
        for shard in shards:
            dst = out_dir / shard.name
            if shard.suffix == ".safetensors":
                report.bytes_written += rewrite(shard, dst, gauge_moves(
                    plan, gauge, read_layout(shard)), hashes=hashes)
            else:  # a pickle-free torch file: loaded whole, saved whole
                import torch

                torch.save({k: plan[k](gauge, t).contiguous()
                            for k, t in load_shard(shard).items()}, dst)
                hashes.feed(shard.read_bytes(), dst.read_bytes())
                report.bytes_written += dst.stat().st_size
        report.source_blake3, report.blake3 = hashes.hexdigests()
    finally:
        hashes.close()
    return report


def checkpoint_identity(model: ModelLike, blake3: str | None = None) -> dict[str, str]:
    """Name and content hash of a checkpoint's weights (BLAKE3 of its weight files in shard
    order), for gauge-file metadata; ``blake3`` when already computed on the way."""
    return open_model(model).identity(blake3)
