"""Transcoders as circuit-tracer stores them: cross-layer transcoders and per-layer sets.

A folder with ``config.yaml`` (``model_kind``, ``feature_input_hook``,
``feature_output_hook``, relative to ``blocks.{L}.``) and either

* a **cross-layer transcoder** (``CrossLayerTranscoder.to_safetensors``), n layers: for each
  layer i ``W_enc_{i}.safetensors`` with ``W_enc_{i}`` [F, d] (encode ``F.linear(x, W_enc,
  b_enc)``: the residual on axis 1), ``b_enc_{i}`` [F], ``b_dec_{i}`` [d] (the bias of output
  layer i), optional ``threshold_{i}`` [F]; and ``W_dec_{i}.safetensors`` with ``W_dec_{i}``
  [F, n−i, d], the decoder of layer i's latents into layers i…n−1. This disk format has no
  skip (``_load_state_dict`` never reads one);
* or a **per-layer transcoder set** (``SingleLayerTranscoder``): ``layer_{i}.safetensors`` with
  ``W_enc`` [F, d], ``W_dec`` [F, d], ``b_enc`` [F], ``b_dec`` [d], optional
  ``activation_function.threshold`` [F], ``W_skip`` [d_out, d_in] (used as ``x @ W_skip.T``)
  and ``k``.

Every layer is the same model's residual stream: one gauge moves every file. Hooks must be in
residual coordinates (``hook_resid_*``, ``ln2.hook_normalized``, ``mlp.hook_in``/``hook_out``,
``hook_mlp_out``, ...): the gain of the norm (in ``mlp.hook_in``) moves unsigned with the
coordinates, so the gained input moves by the signed rule like the residual.
Gemma Scope 2 CLTs (``params_layer_{i}.safetensors``) are the ``gemmascope`` kind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import read_text
from .base import H0, H1, H2, UNTOUCHED, Planned, one_layout, plan_file, rules, write_folder

ENC = re.compile(r"W_enc_(\d+)\.safetensors")
DEC = re.compile(r"W_dec_(\d+)\.safetensors")
LAYER = re.compile(r"layer_(\d+)\.safetensors")
PLT_RULES = rules([
    ("W_enc", (H1,)),  # [F, d]
    ("W_dec", (H1,)),  # [F, d]
    ("b_dec", (H0,)),
    ("W_skip", (H0, H1)),  # [d_out, d_in]
    (r"b_enc|activation_function\.threshold|k", UNTOUCHED),
])
PLT_REQUIRED = {k: k for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
RESIDUAL_HOOK = re.compile(r"(blocks\.\d+\.)?(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out"
                           r"|ln\d\.hook_normalized|mlp\.hook_(in|out))")


def _enc_rules(i: int) -> tuple[Any, dict[str, str]]:
    table = rules([(f"W_enc_{i}", (H1,)), (f"b_dec_{i}", (H0,)),
                   (f"b_enc_{i}|threshold_{i}", UNTOUCHED)])
    return table, {k: k for k in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}")}


def _indexed(src: Path, pattern: re.Pattern[str]) -> dict[int, str]:
    return {int(m[1]): p.name for p in src.iterdir() if (m := pattern.fullmatch(p.name))}


def read_config(src: Path) -> dict[str, Any]:
    """``config.yaml`` (if any), its hooks checked to be residual coordinates."""
    path = src / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(read_text(path, "circuit-tracer config"))
    except yaml.YAMLError as exc:
        first = str(exc).strip().split("\n", 1)[0]
        raise GaugefixError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(cfg, dict):
        raise GaugefixError(f"{path}: expected a YAML mapping (circuit-tracer config)")
    for key in ("feature_input_hook", "feature_output_hook"):
        hook = cfg.get(key)
        if hook is None:
            continue
        if not isinstance(hook, str) or not RESIDUAL_HOOK.fullmatch(hook):
            raise GaugefixError(f"{path}: {key} {hook!r} is not in residual coordinates (MLP "
                                "neurons, attention heads, ...); a residual gauge does not act "
                                "on it")
    return cfg


def _contiguous(idx: dict[int, str], src: Path, what: str) -> list[int]:
    layers = sorted(idx)
    if layers != list(range(len(layers))):
        raise GaugefixError(f"clt: {src} has {what} for layers {layers}; expected 0…"
                            f"{len(layers) - 1} without gaps")
    return layers


def transport_clt(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                  record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Move a circuit-tracer transcoder folder (cross-layer or per-layer) into the other
    chart, written to ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise GaugefixError(f"clt: {src} is not a circuit-tracer transcoder folder (expected "
                            "W_enc_{i}/W_dec_{i}.safetensors or layer_{i}.safetensors)")
    cfg = read_config(src)
    enc, dec, plt = (_indexed(src, p) for p in (ENC, DEC, LAYER))
    one_layout(src, "clt", {
        "cross-layer transcoder": [enc[i] for i in sorted(enc)] + [dec[i] for i in sorted(dec)],
        "per-layer transcoder set": [plt[i] for i in sorted(plt)]})
    files: dict[str, Planned] = {}
    if enc or dec:
        kind = "cross_layer_transcoder"
        layers = _contiguous(enc, src, "W_enc files")
        if sorted(dec) != layers:
            raise GaugefixError(f"clt: {src} has W_enc files for layers {layers} but W_dec "
                                f"files for {sorted(dec)}")
        n = len(layers)
        for i in layers:
            table, required = _enc_rules(i)
            what = f"clt ({enc[i]})"
            files[enc[i]] = plan_file(src / enc[i], table, gauge, what, "CLT weights file",
                                      required=required)
            name = f"W_dec_{i}"  # [F, n − i, d]
            files[dec[i]] = plan_file(src / dec[i], rules([(name, (H2,))]), gauge,
                                      f"clt ({dec[i]})", "CLT weights file",
                                      required={name: name})
            shape = files[dec[i]].layout.entries[0].shape
            if shape[1] != n - i:
                raise GaugefixError(f"clt: {dec[i]}: {name} has shape {list(shape)}; expected "
                                    f"[F, {n - i}, {gauge.d}] (layer {i} decodes into layers "
                                    f"{i}…{n - 1})")
    elif plt:
        kind = "transcoder_set"
        layers = _contiguous(plt, src, "layer files")
        for i in layers:
            files[plt[i]] = plan_file(src / plt[i], PLT_RULES, gauge, f"clt ({plt[i]})",
                                      "transcoder weights file", required=PLT_REQUIRED)
    else:
        raise GaugefixError(f"clt: {src} has no W_enc_{{i}}.safetensors (cross-layer "
                            "transcoder) or layer_{i}.safetensors (per-layer transcoders); "
                            "unknown layout")
    if cfg.get("model_kind") not in (None, kind):
        raise GaugefixError(f"clt: {src}/config.yaml says model_kind {cfg['model_kind']!r}, "
                            f"but the files are a {kind}")
    write_folder(src, dst, dict(files), record=record, overwrite=overwrite)
    return {"layout": kind, "layers": len(layers), "files": len(files),
            "tensors": sum(len(p.layout.entries) for p in files.values())}
