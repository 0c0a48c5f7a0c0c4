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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch import Op
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_file

RESIDUAL = Op("H", -1)
SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".gguf")


def _move(t: Any, gauge: SignedPerm, where: str) -> Any:
    if not isinstance(t, torch.Tensor | np.ndarray) or t.ndim == 0:
        raise GaugefixError(f"steering: {where} is not a vector (found {type(t).__name__})")
    if t.shape[-1] != gauge.d:
        raise GaugefixError(f"width mismatch: steering vector {where} has size {t.shape[-1]}, "
                            f"the gauge has d={gauge.d}")
    return RESIDUAL(gauge, t)


def _steering_vector_class() -> Any:
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        return None
    return SteeringVector


def _load_pt(path: Path) -> Any:
    sv_cls = _steering_vector_class()
    allowed = [sv_cls] if sv_cls is not None else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        hint = "" if sv_cls is not None else (
            " (a pickled SteeringVector needs the steering-vectors package installed)")
        raise GaugefixError(f"{path}: not a steering vector file readable with "
                            f"weights_only=True{hint}") from exc


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
    if not src.is_file():
        raise GaugefixError(f"steering vector file not found: {src}")
    if src.suffix not in SUFFIXES:
        raise GaugefixError(f"steering: unknown file type {src.suffix!r}; expected one of "
                            f"{', '.join(SUFFIXES)}")
    if dst.suffix != src.suffix:
        raise GaugefixError(f"output must keep the input's format ({src.suffix})")
    n = 0
    if src.suffix in (".pt", ".pth"):
        out = _transport_pt(_load_pt(src), gauge)
        n = len(out.layer_activations) if hasattr(out, "layer_activations") else (
            len(out) if isinstance(out, dict) else 1)
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp, open(tmp, "wb") as f:
            torch.save(out, f)
    elif src.suffix == ".npy":
        try:
            arr = np.load(src, allow_pickle=False)
        except ValueError as exc:
            raise GaugefixError(f"{src}: not a numeric .npy array ({exc})") from None
        out_arr = _move(arr, gauge, "array")
        n = 1 if arr.ndim == 1 else int(np.prod(arr.shape[:-1]))
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp, open(tmp, "wb") as f:
            np.save(f, out_arr)
    elif src.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        try:
            with safe_open(str(src), "pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(src))
        except Exception as exc:
            raise GaugefixError(f"{src}: not a safetensors file ({exc})") from None
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

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
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
        directions[int(t.name.split(".", 1)[1])] = np.array(t.data, dtype=np.float32).reshape(-1)
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
