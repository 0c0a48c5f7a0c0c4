"""Gemma Scope SAEs and transcoders, in the files Google publishes.

* **Gemma Scope (Gemma 2)**: a folder holding ``params.npz`` (no config; the hook is in the
  repository and folder names). Arrays ``W_enc`` [d, F], ``W_dec`` [F, d], ``b_enc`` [F],
  ``b_dec`` [d], ``threshold`` [F] (SAELens also accepts ``w_*`` spellings and an optional
  ``scaling_factor`` [F]). Forward pass: ``pre = x W_enc + b_enc``, ``relu(pre)·(pre >
  threshold)``, ``acts W_dec + b_dec``.
* **Gemma Scope 2 (Gemma 3)**: ``params.safetensors`` (+ ``config.json``) with lowercase
  ``w_enc`` [d, F], ``w_dec`` [F, d], ``b_enc``, ``b_dec``, ``threshold`` and, for affine
  transcoders, ``affine_skip_connection`` [d_in, d_out] (used as ``x @ A``); multi-layer
  objects (CLTs, crosscoders across layers) as ``params_layer_{i}.safetensors``, one file per
  layer, whose ``w_dec`` [F_l, n, d] decodes into every layer.

The encoder reads the residual on its first axis, the decoder writes it on its last,
``b_dec`` lives in it, the affine skip has it on both axes; latent tensors are untouched.
One gauge moves every layer (they are one model's residual stream).

Attention-output SAEs (``gemma-scope-*-att``, Gemma Scope 2's ``attn_out``) read head
outputs (``hook_z``, ``o_proj.input``), not residual coordinates: refused. A ``params.npz``
is rewritten member by member with numpy's own header and the zip entry's own attributes, so
only the moved arrays' values change (moving back restores the file byte for byte); it is
read without pickles, and the transport is recorded in a ``gaugefix.json`` beside it.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arch import Op, check_dtype
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import check_regular, note_input, read_json
from .base import (
    H0,
    H1,
    UNTOUCHED,
    FileWriter,
    Planned,
    check_width,
    move,
    one_layout,
    plan_file,
    plan_names,
    rules,
    write_folder,
)

H_LAST = Op("H", -1)
NPZ_RULES = rules([
    ("[Ww]_enc", (H0,)),
    ("[Ww]_dec", (H1,)),
    ("b_dec", (H0,)),
    ("b_enc|threshold|scaling_factor", UNTOUCHED),
])
NPZ_REQUIRED = {"W_enc": "[Ww]_enc", "W_dec": "[Ww]_dec", "b_enc": "b_enc", "b_dec": "b_dec",
                "threshold": "threshold"}
V2_RULES = rules([
    ("w_enc", (H0,)),
    ("w_dec", (H_LAST,)),  # [F, d], or [F_l, n, d] in a multi-layer file
    ("b_dec", (H0,)),
    ("affine_skip_connection", (H0, H1)),
    ("b_enc|threshold", UNTOUCHED),
])
V2_REQUIRED = {k: k for k in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")}
MULTI = re.compile(r"params_layer_(\d+)\.safetensors")
RECORD = "gaugefix.json"
# Gemma Scope 2 hooks outside residual coordinates: attention heads before o_proj, MLP neurons
NOT_RESIDUAL = re.compile(r".*(o_proj|down_proj)\.input|.*(q|k|v|gate|up)_proj\.output")


@dataclass(frozen=True)
class NpyMember:
    """One array of an ``.npz``: its zip entry, ``.npy`` header and how it moves."""

    info: zipfile.ZipInfo
    name: str
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype[Any]
    ops: tuple[Op, ...]


def _npy_header(f: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and header length of the ``.npy`` stream ``f``."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise GaugefixError(f"{where}: not a numeric .npy array ({exc})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise GaugefixError(f"{where}: dtype {dtype} is not numeric; gaugefix reads arrays, "
                            "never pickled objects")
    return tuple(shape), bool(fortran), dtype, f.tell()


def plan_npz(path: Path, gauge: SignedPerm, what: str) -> list[NpyMember]:
    """Every array of a Gemma Scope ``params.npz``, checked (names, widths, dtypes, and every
    member read through once: its CRC and its length against its ``.npy`` header) before
    anything is written, so a damaged file is one error naming it, never a failure halfway
    through the rewrite."""
    check_regular(path, "Gemma Scope params.npz")
    note_input(path)
    members: list[NpyMember] = []
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            bad = [i.filename for i in infos if not i.filename.endswith(".npy")]
            if bad:
                raise GaugefixError(f"{path}: entries {bad} are not .npy arrays; not a numpy "
                                    ".npz file")
            names = [i.filename[:-4] for i in infos]
            plan = plan_names(names, NPZ_RULES, what, required=NPZ_REQUIRED, where=path.name)
            for info, name in zip(infos, names, strict=True):
                with z.open(info) as f:
                    shape, fortran, dtype, offset = _npy_header(f, f"{path}:{name}")
                    while f.read(1 << 22):  # to the end: zipfile checks the CRC there
                        pass
                check_width(name, shape, plan[name], gauge.d, what)
                check_dtype(name, dtype, plan[name], gauge, what)
                size = offset + int(np.prod(shape)) * dtype.itemsize
                if info.file_size != size:
                    raise GaugefixError(f"{path}: member {info.filename} holds "
                                        f"{info.file_size} bytes, but its header says "
                                        f"{list(shape)} {dtype} ({size} bytes); a truncated "
                                        "or damaged .npz file")
                members.append(NpyMember(info, name, shape, fortran, dtype, plan[name]))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as exc:
        raise GaugefixError(f"{path}: not a readable .npz file ({exc})") from None
    return members


def rewrite_npz(src: Path, dst: Path, members: list[NpyMember], gauge: SignedPerm) -> None:
    """``src`` with each array moved: same entries, in the same order, with the same zip
    attributes and ``.npy`` headers; untouched arrays copied as their bytes."""
    try:
        _rewrite_npz(src, dst, members, gauge)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as exc:
        # checked when planned: only a file changed since then gets here (nothing is kept)
        raise GaugefixError(f"{src}: not a readable .npz file ({exc}); nothing was "
                            "written") from None


def _rewrite_npz(src: Path, dst: Path, members: list[NpyMember], gauge: SignedPerm) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        zout.comment = zin.comment
        for m in members:
            raw = zin.read(m.info)
            parts: list[Any] = [raw]
            if m.ops:  # the member's own header, then the moved values (in its order)
                *_, offset = _npy_header(io.BytesIO(raw), f"{src}:{m.name}")
                order = "F" if m.fortran else "C"
                arr = np.frombuffer(raw, m.dtype, int(np.prod(m.shape)), offset)
                moved = move(arr.reshape(m.shape, order=order), m.ops, gauge)
                parts = [memoryview(raw)[:offset],
                         memoryview(moved) if order == "C" else moved.tobytes(order="F")]
            info = zipfile.ZipInfo(m.info.filename, m.info.date_time)
            for attr in ("compress_type", "external_attr", "create_system", "comment"):
                setattr(info, attr, getattr(m.info, attr))
            with zout.open(info, "w", force_zip64=True) as f:  # as numpy.savez writes it
                for part in parts:
                    f.write(part)


def _check_hooks(src: Path, cfg: dict[str, Any]) -> list[str]:
    hooks = [cfg[k] for k in ("hf_hook_point_in", "hf_hook_point_out") if k in cfg]
    for hook in hooks:
        if not isinstance(hook, str):
            raise GaugefixError(f"{src}: config.json's hook must be text, got {hook!r}")
        if NOT_RESIDUAL.fullmatch(hook):
            raise GaugefixError(f"{src}: hook {hook!r} is not in residual coordinates "
                                "(attention heads or MLP neurons); a residual gauge does not "
                                "act on it")
    return hooks


def transport_gemmascope(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                         record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Move a Gemma Scope (``params.npz``) or Gemma Scope 2 (``params.safetensors`` or
    ``params_layer_{i}.safetensors``) folder into the other chart, written to ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise GaugefixError(f"gemmascope: {src} is not a Gemma Scope folder (expected a "
                            "directory with params.npz, params.safetensors or "
                            "params_layer_{i}.safetensors)")
    if re.search(r"gemma-scope-[\w.-]*-att(?![a-z])|(^|/)attn_out(/|$)", src.resolve().as_posix()):
        raise GaugefixError(f"{src}: an attention-output SAE reads attention head outputs "
                            "(hook_z), which live in head space, not residual coordinates; it "
                            "is unchanged by a residual gauge and needs no transport")
    multi = sorted((p.name for p in src.iterdir() if MULTI.fullmatch(p.name)),
                   key=lambda n: int(MULTI.fullmatch(n)[1]))  # type: ignore[index]
    npz, single = ([n] if (src / n).is_file() else [] for n in ("params.npz",
                                                                  "params.safetensors"))
    one_layout(src, "gemmascope", {"Gemma Scope": npz, "Gemma Scope 2": single,
                                   "Gemma Scope 2 multi-layer": multi})
    files: dict[str, Planned | FileWriter]
    hooks: list[str] = []
    if npz:
        layout, what = "gemma-scope", "gemmascope (params.npz)"
        members = plan_npz(src / "params.npz", gauge, what)
        files = {"params.npz": lambda s, d: rewrite_npz(s, d, members, gauge),
                 RECORD: lambda _s, d: d.write_text(json.dumps(record, indent=1) + "\n")}
        tensors = len(members)
    elif (src / "params.safetensors").is_file() or multi:
        layout = "gemma-scope-2" + (" (multi-layer)" if multi else "")
        names = multi or ["params.safetensors"]
        if (src / "config.json").is_file():
            hooks = _check_hooks(src, read_json(src / "config.json", "Gemma Scope 2 config"))
        files = {n: plan_file(src / n, V2_RULES, gauge, f"gemmascope ({n})",
                              "Gemma Scope 2 weights file", required=V2_REQUIRED)
                 for n in names}
        tensors = sum(len(p.layout.entries) for p in files.values()
                      if isinstance(p, Planned))
    else:
        raise GaugefixError(f"gemmascope: {src} has no params.npz (Gemma Scope), "
                            "params.safetensors or params_layer_{i}.safetensors (Gemma Scope "
                            "2); unknown layout")
    write_folder(src, dst, files, record=record, overwrite=overwrite)
    return {"layout": layout, "files": len([n for n in files if n != RECORD]),
            "tensors": tensors, **({"hooks": hooks} if hooks else {})}
