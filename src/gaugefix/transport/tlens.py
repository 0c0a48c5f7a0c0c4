"""What TransformerLens' weight processing does to the gauge (SAEs hooked on HookedTransformer).

SAELens records how the model an SAE was trained on was loaded in
``metadata.model_class_name`` and ``metadata.model_from_pretrained_kwargs`` (pre-6.0
configs: the same keys at the top level). ``HookedTransformer.from_pretrained`` defaults to
``fold_ln=True, center_writing_weights=True, center_unembed=True``; SAELens' training runner
writes ``{"center_writing_weights": False}`` when none are given, so a saved cfg usually
says explicitly.

**center_writing_weights** subtracts the mean over d from every weight that writes the
residual (W_E, W_pos, W_O, b_O, W_out, b_out), for LayerNorm models only (TransformerLens
skips it for RMSNorm and ``final_rms``). The residual such an SAE reads is then
``P·x`` with ``P = I − 11ᵀ/d``, and what it writes is meant to live in P's image. For a
gauge ``Q = S·Π``: ``Q P Qᵀ = I − (S1)(S1)ᵀ/d``, which is P exactly when ``S1 = ±1``, i.e.
for permutations and one global sign, and not for per-coordinate signs: centring then
moving differs from moving then centring, and the moved SAE would not live in the moved
model's centred chart. :func:`check_tl_processing` refuses that case. (A per-coordinate-sign
gauge is not a symmetry of a LayerNorm model anyway; if the model uses RMSNorm,
TransformerLens skipped the centring and the cfg's flag is moot.)

**fold_ln** multiplies the norm's gain into the weights that *read* the normalised
residual (W_Q/K/V, W_in, W_gate, W_U) and replaces the norm by its gain-free version. It
changes no residual coordinate: the gain is applied after the norm, never stored in the
residual, so ``hook_resid_*``, ``hook_attn_out`` and ``hook_mlp_out`` are the same with and
without folding, and TransformerLens' ``ln*.hook_normalized`` is the gain-free ``x/rms``
either way. An SAE on such a hook lives in the residual's own chart, and transport is the
signed rule, whatever fold_ln was. Folding also commutes with the gauge: the gain moves
unsigned and the reader signed, so ``diag(Π w)·(Q W) = Q·(diag(w)·W)``. The one chart
difference to watch is a *hook* difference, not a fold: a transcoder trained on the gained
norm output (HF ``post_attention_layernorm``, Gemma Scope 2's ``pre_feedforward_layernorm``,
circuit-tracer's ``mlp.hook_in``) reads ``w ⊙ x/rms``, one trained on ``ln2.hook_normalized``
reads ``x/rms``; both move by the signed rule (``Πw ⊙ Qx = Q(w ⊙ x)``), but they are not
interchangeable with each other in either chart. (For LayerNorm models fold_ln also centres
the reading weights, which is the same ``P`` as above on the reading side; such models only
admit permutations and a global sign, for which P is invariant.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import json_type

TL_DEFAULTS = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}


def tl_processing(cfg: dict[str, Any]) -> dict[str, bool] | None:
    """The TransformerLens processing an SAELens cfg says its model was loaded with:
    ``{"fold_ln": ..., "center_writing_weights": ...}`` (TransformerLens' defaults filled in
    for keys the kwargs leave out), or None when the model was not a HookedTransformer
    (``model_class_name`` names another class) or the cfg does not record the kwargs."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    cls = meta.get("model_class_name", cfg.get("model_class_name"))
    kwargs = meta.get("model_from_pretrained_kwargs", cfg.get("model_from_pretrained_kwargs"))
    if cls not in (None, "HookedTransformer") or kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise GaugefixError(f"cfg.json's model_from_pretrained_kwargs must be an object, got "
                            f"{json_type(kwargs)}")
    out = {}
    for key in ("fold_ln", "center_writing_weights"):
        value = kwargs.get(key, TL_DEFAULTS[key])
        if not isinstance(value, bool):
            raise GaugefixError(f"cfg.json's model_from_pretrained_kwargs.{key} must be true or "
                                f"false, got {value!r}")
        out[key] = value
    return out


def check_tl_processing(cfg: dict[str, Any], gauge: SignedPerm, where: Path | str) -> None:
    """Refuse a gauge with per-coordinate signs for an SAE whose cfg says it was trained on a
    TransformerLens model with centred writing weights (see the module docstring); fold_ln
    needs nothing."""
    proc = tl_processing(cfg)
    if proc is None or not proc["center_writing_weights"] or gauge.global_sign is not None:
        return
    raise GaugefixError(
        f"{where}: the SAE was trained on a TransformerLens model loaded with "
        "center_writing_weights=True (model_from_pretrained_kwargs), whose residual is "
        "P·x with P = I − 11ᵀ/d; P commutes with permutations and one global sign, not with "
        "this gauge's per-coordinate signs (if the model uses RMSNorm, TransformerLens "
        "skipped the centring: set center_writing_weights to false in a copy of cfg.json)")
