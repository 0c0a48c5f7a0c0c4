"""Sparse autoencoders and transcoders in residual coordinates.

SAELens folders (``cfg.json`` + ``sae_weights.safetensors`` [+ ``sparsity.safetensors``]):
standard, jumprelu, topk, gated, transcoder, skip_transcoder (and any newer
architecture using the same tensor names). EleutherAI sparsify folders
(``cfg.json`` + ``sae.safetensors`` with ``encoder.weight``).

Forward pass ``(x − b_dec) W_enc + b_enc → acts → acts W_dec + b_dec``: the
encoder reads the residual on axis 0, the decoder writes it on axis 1, ``b_dec``
lives in it, a skip matrix has it on both axes; latent-space tensors are untouched.
A cfg saying the SAE was trained on a TransformerLens model with centred writing weights
refuses per-coordinate signs (:mod:`gaugefix.transport.tlens`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import json_type, read_json
from .base import H0, H1, UNTOUCHED, one_layout, plan_file, rules, write_folder
from .tlens import check_tl_processing

LATENT = r"b_enc|threshold|log_threshold|b_gate|b_mag|r_mag"
SAELENS_RULES = rules([
    ("W_enc", (H0,)),
    ("W_dec", (H1,)),
    ("b_dec", (H0,)),
    ("W_skip", (H0, H1)),
    (LATENT, UNTOUCHED),
])
SPARSIFY_RULES = rules([
    (r"encoder\.weight", (H1,)),  # nn.Linear(d_in, num_latents): [num_latents, d_in]
    (r"encoder\.bias", UNTOUCHED),
    ("W_dec", (H1,)),
    ("b_dec", (H0,)),
    ("W_skip", (H0, H1)),
])

# Hooks whose activations are residual-stream coordinates (TransformerLens names and
# raw HF module paths as used by SAELens' HookedProxyLM and by sparsify).
RESIDUAL_HOOK = re.compile(
    r"(blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|hook_attn_in"
    r"|hook_mlp_in|ln\d\.hook_normalized)|hook_embed|ln_final\.hook_normalized"
    r"|([\w.]*\.)?(layers|h)\.\d+(\.(mlp|self_attn|attn|mixer))?)"
)


def hook_names(cfg: dict[str, Any]) -> list[str]:
    """The hooks an SAELens (v6 or pre-6) or sparsify config reads and writes."""
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise GaugefixError(f"sae: cfg.json's metadata must be an object, got {json_type(meta)}")
    fields = {"metadata.hook_name": meta.get("hook_name"),
              "metadata.hook_name_out": meta.get("hook_name_out"),
              **{k: cfg.get(k) for k in ("hook_name", "hook_point", "hook_name_out", "hookpoint")}}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise GaugefixError(f"sae: cfg.json's {key} must be a hook name (text), got "
                                f"{value!r}")
    return [n for n in dict.fromkeys(fields.values()) if n]


def check_residual(cfg: dict[str, Any], gauge: SignedPerm, where: Path) -> None:
    if cfg.get("reshape_activations") == "hook_z":
        raise GaugefixError(f"{where}: this SAE reads attention head outputs (hook_z), which "
                            "live in head space, not residual coordinates; it is unchanged by a "
                            "residual gauge and needs no transport")
    for hook in hook_names(cfg):
        if not RESIDUAL_HOOK.fullmatch(hook):
            raise GaugefixError(f"{where}: hook {hook!r} is not in residual coordinates (MLP "
                                "neurons, attention heads, ...); a residual gauge does not act "
                                "on it")
    norm = cfg.get("normalize_activations")
    if norm == "layer_norm" and gauge.global_sign is None:
        raise GaugefixError(f"{where}: normalize_activations='layer_norm' subtracts the mean, "
                            "which commutes only with permutations and one global sign; this "
                            "gauge has per-coordinate signs")
    check_tl_processing(cfg, gauge, where)


def transport_sae(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                  record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise GaugefixError(f"sae: {src} is not an SAE folder (expected a directory with "
                            "cfg.json and sae_weights.safetensors or sae.safetensors)")
    held = one_layout(src, "sae", {
        layout: [name] if (src / name).is_file() else []
        for layout, name in (("SAELens", "sae_weights.safetensors"),
                             ("sparsify", "sae.safetensors"))})
    if held == "SAELens":
        layout, weights, table = "saelens", "sae_weights.safetensors", SAELENS_RULES
    elif held == "sparsify":
        layout, weights, table = "sparsify", "sae.safetensors", SPARSIFY_RULES
    else:
        raise GaugefixError(f"sae: {src} has neither sae_weights.safetensors (SAELens) nor "
                            "sae.safetensors (sparsify); unknown layout")
    if not (src / "cfg.json").is_file():
        raise GaugefixError(f"sae: {src} has no cfg.json")
    cfg = read_json(src / "cfg.json", "SAE config")
    if layout == "sparsify" and "hookpoint" not in cfg and re.search(r"(layers|h)\.\d", src.name):
        cfg = {**cfg, "hookpoint": src.name}  # sparsify names the folder after the hookpoint
    check_residual(cfg, gauge, src)
    planned = plan_file(src / weights, table, gauge, f"sae ({layout})", "SAE weights file")
    write_folder(src, dst, {weights: planned}, record=record, overwrite=overwrite)
    return {"layout": layout, "architecture": cfg.get("architecture", "standard"),
            "tensors": len(planned.layout.entries), "hooks": hook_names(cfg)}
