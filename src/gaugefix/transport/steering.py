"""Steering vectors: residual directions, one per layer or a single one.

Layouts (the output keeps the input's):

* ``.pt`` — a tensor ``[..., d]``, a dict ``{layer: tensor [d]}``, or a
  ``steering_vectors.SteeringVector`` saved with ``torch.save`` (read with
  ``weights_only=True`` and only that class allowed);
* ``.safetensors`` — named tensors ``[..., d]`` (the gauge is recorded in metadata);
* ``.npy`` — an array ``[..., d]``;
* ``.gguf`` — a repeng / llama.cpp control vector (``direction.{k}`` tensors).

Every vector's last axis is the residual axis: H(-1), signed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch import Op, check_dtype
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import (
    atomic_file,
    check_regular,
    load_npy,
    load_safetensors,
    note_input,
    torch_load,
)
from .base import no_record

RESIDUAL = Op("H", -1)
SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".gguf")


def _move(t: Any, gauge: SignedPerm, where: str) -> Any:
    if not isinstance(t, torch.Tensor | np.ndarray) or t.ndim == 0:
        raise GaugefixError(f"steering: {where} is not a vector (found {type(t).__name__})")
    if t.shape[-1] != gauge.d:
        raise GaugefixError(f"width mismatch: steering vector {where} has size {t.shape[-1]}, "
                            f"the gauge has d={gauge.d}")
    check_dtype(where, t.dtype, (RESIDUAL,), gauge, "steering")
    return RESIDUAL(gauge, t)


def _steering_vector_class() -> Any:
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        return None
    return SteeringVector


def _load_pt(path: Path) -> Any:
    """A tensor, a dict of tensors, or a SteeringVector (the one class allowed)."""
    sv_cls = _steering_vector_class()
    return torch_load(path, "steering vector file", allowed=[sv_cls] if sv_cls else [])


def _transport_pt(obj: Any, gauge: SignedPerm) -> Any:
    sv_cls = _steering_vector_class()
    if isinstance(obj, torch.Tensor):
        return _move(obj, gauge, "tensor")
    if sv_cls is not None and isinstance(obj, sv_cls):
        acts = {k: _move(v, gauge, f"layer {k}") for k, v in obj.layer_activations.items()}
        return sv_cls(layer_activations=acts, layer_type=obj.layer_type)
    if isinstance(obj, dict) and obj:
        return {k: _move(v, gauge, f"entry {k!r}") for k, v in obj.items()}
    raise GaugefixError(f"steering: unknown .pt layout ({type(obj).__name__}); expected a "
                        "tensor, a {layer: tensor} dict or a SteeringVector")


def transport_steering(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                       record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    src, dst = Path(src), Path(dst)
    check_regular(src, "steering vector file")
    if src.suffix not in SUFFIXES:
        raise GaugefixError(f"steering: unknown file type {src.suffix!r}; expected one of "
                            f"{', '.join(SUFFIXES)}")
    if dst.suffix != src.suffix:
        raise GaugefixError(f"output must keep the input's format ({src.suffix})")
    if src.suffix in (".pt", ".pth", ".npy"):
        no_record(record, f"a {src.suffix} steering vector")
    n = 0
    if src.suffix in (".pt", ".pth"):
        out = _transport_pt(_load_pt(src), gauge)
        n = len(out.layer_activations) if hasattr(out, "layer_activations") else (
            len(out) if isinstance(out, dict) else 1)
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp, open(tmp, "wb") as f:
            torch.save(out, f)
    elif src.suffix == ".npy":
        arr = load_npy(src, "steering vector")
        out_arr = _move(arr, gauge, "array")
        n = 1 if arr.ndim == 1 else int(np.prod(arr.shape[:-1]))
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp, open(tmp, "wb") as f:
            np.save(f, out_arr)
    elif src.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors, meta = load_safetensors(src, "steering vector file")
        out_t = {k: _move(v, gauge, repr(k)).contiguous() for k, v in tensors.items()}
        n = len(out_t)
        meta["gaugefix"] = json.dumps(record)
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp:
            save_file(out_t, str(tmp), metadata=meta)
    else:
        n = _transport_gguf(src, dst, gauge, record, overwrite)
    return {"vectors": n}


def read_control_vector(path: str | Path) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """A repeng/llama.cpp control vector: ``{layer: direction}`` and its metadata."""
    import gguf

    from ..quant.gguf_file import open_reader

    note_input(path)
    try:
        reader = open_reader(path, what="control vector")
    except GaugefixError:
        raise
    except (ValueError, OSError, IndexError, KeyError, EOFError, struct.error) as exc:
        raise GaugefixError(f"{path}: not a GGUF file ({exc})") from None

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else (
            value.tolist()[0])

    if field("general.architecture") != "controlvector":
        raise GaugefixError(f"{path}: a GGUF file but not a control vector "
                            f"(general.architecture = {field('general.architecture')!r})")
    directions: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            raise GaugefixError(f"{path}: unexpected tensor {t.name!r} in a control vector")
        layer = t.name.split(".", 1)[1]
        if not layer.isdigit():
            raise GaugefixError(f"{path}: control-vector tensor {t.name!r} names no layer")
        directions[int(layer)] = np.array(t.data, dtype=np.float32).reshape(-1)
    meta = {"model_hint": field("controlvector.model_hint"),
            "layer_count": field("controlvector.layer_count"),
            "gaugefix": field("gaugefix.transport")}
    return directions, meta


def write_control_vector(path: Path, directions: dict[int, np.ndarray], model_hint: str,
                         extra: str | None = None) -> None:
    """The layout repeng's ``export_gguf`` writes and llama.cpp reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    if extra is not None:
        writer.add_string("gaugefix.transport", extra)
    for layer in sorted(directions):
        writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(directions[layer],
                                                                     dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _transport_gguf(src: Path, dst: Path, gauge: SignedPerm, record: dict[str, Any],
                    overwrite: bool) -> int:
    directions, meta = read_control_vector(src)
    moved = {k: _move(v, gauge, f"direction.{k}") for k, v in directions.items()}
    with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp:
        write_control_vector(tmp, moved, meta["model_hint"] or "", json.dumps(record))
    return len(moved)
