"""Which causal-LM model types of the installed transformers gaugefix moves exactly: a sweep.

For every model type in transformers' causal-LM mapping, a tiny random config is built from
the model type's own config class (sizes shrunk where the config has them), the model is
instantiated offline, and classified:

* ``supported`` — its family is in the architecture map; a random gauge of the family's group
  is applied and an independent check compares logits and every hidden state;
* ``failed`` — its family is in the map, but the check fails (a defect of the map);
* ``candidate`` — not in the map, but one family's rules plan every tensor and the check
  passes: the rules fit, the model type can be added to that family (as data);
* ``unsupported`` — not in the map, and no family's rules both plan it and pass the check
  (the reason names what did not fit);
* ``not a decoder`` — an encoder or encoder-decoder model registered for causal LM;
* ``not buildable offline`` — its config or model cannot be built here (the error).

An unknown tensor is never skipped: planning fails on it, and the sweep says which.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .arch import Family, families
from .errors import GaugefixError
from .group import SignedPerm
from .tiny import MAX_PARAMETERS, shrunk_config

DECODER_ONLY_EXCLUDE = ("bert", "roberta", "electra", "ernie", "xlm", "xmod", "roformer",
                        "rembert", "camembert", "data2vec", "big_bird", "megatron",
                        "prophetnet", "roc_bert", "xlnet", "reformer", "bert-generation")


@dataclass
class Coverage:
    model_type: str
    status: str
    family: str | None = None
    group: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def causal_lm_types() -> list[str]:
    """Every model type registered for causal LM in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _group_gauge(fam: Family, d: int, seed: int) -> SignedPerm:
    return SignedPerm.random(d, seed=seed, kind="signed" if fam.allows_signs else "global")


def _generic(model: torch.nn.Module, fam: Family, seed: int) -> None:
    """Norm gains and LayerNorm biases made generic (they start at 1 and 0: a larger gauge)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if fam.op_for(key).kind in ("G", "LB") and tensor.is_floating_point():
                tensor.add_(0.5 * torch.randn(tensor.shape, generator=gen).to(tensor.dtype))


def check_family(model: torch.nn.Module, fam: Family, d: int, seed: int = 0,
                 tol: float = 1e-4) -> str | None:
    """None when a random gauge of ``fam``'s group, applied with ``fam``'s rules, leaves the
    model's logits and hidden states as they were (moved); else what went wrong."""
    import copy

    from .apply import gauge_model
    from .verify import compare_models, probe_tokens

    try:
        fam.plan(model.state_dict())
    except GaugefixError as exc:
        return str(exc)
    a = copy.deepcopy(model)
    _generic(a, fam, seed)
    g = _group_gauge(fam, d, seed + 1)
    try:
        b = gauge_model(a, g, family=fam)
        ids = probe_tokens(min(int(getattr(model.config, "vocab_size", 128) or 128), 128),
                           64, 16, seed=seed)
        rep = compare_models(a, b, g, ids)
    except (GaugefixError, RuntimeError, ValueError, IndexError) as exc:
        return f"{type(exc).__name__}: {exc}"
    worst = rep.max_rel_err
    if not worst <= tol:
        return f"function changed (relative error {worst:.2e})"
    return None


def gain_offset(model: torch.nn.Module, fam: Family) -> float | None:
    """The offset a norm adds to its stored gain, measured on the model's own module: a norm
    with a zero stored gain outputs 0 when it multiplies by the gain (offset 0) and the
    normalised input when it multiplies by 1 + gain (offset 1). None: no gain to measure."""
    import copy

    for key in model.state_dict():
        if fam.op_for(key).kind != "G" or not key.endswith(".weight"):
            continue
        module = model.get_submodule(key.rsplit(".", 1)[0])
        probe = copy.deepcopy(module)
        with torch.no_grad():
            probe.weight.zero_()
            x = torch.randn(2, 3, probe.weight.shape[0], generator=torch.Generator().manual_seed(0))
            try:
                y = probe(x)
            except (TypeError, RuntimeError):
                return None
        return 0.0 if float(y.abs().max()) < 1e-6 else 1.0
    return None


def _hidden(cfg: Any) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    text = getattr(cfg, "text_config", None)
    return _hidden(text) if text is not None else None


def sweep_one(model_type: str, seed: int = 0) -> Coverage:
    from transformers import AutoModelForCausalLM

    if any(model_type.startswith(p) for p in DECODER_ONLY_EXCLUDE):
        return Coverage(model_type, "not a decoder",
                        detail="an encoder model registered for causal LM")
    try:
        cfg = shrunk_config(model_type)
        if getattr(cfg, "is_encoder_decoder", False):
            return Coverage(model_type, "not a decoder", detail="encoder-decoder")
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        if n > MAX_PARAMETERS:
            return Coverage(model_type, "not buildable offline",
                            detail=f"the shrunk config still has {n / 1e6:.0f}M parameters")
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_config(cfg).eval()
    except Exception as exc:
        return Coverage(model_type, "not buildable offline",
                        detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    d = _hidden(model.config)
    if d is None:
        return Coverage(model_type, "not buildable offline", detail="no hidden size")
    known = next((f for f in families().values() if model_type in f.model_types), None)
    if known is not None:
        problem = check_family(model, known, d, seed)
        return Coverage(model_type, "failed" if problem else "supported", known.name,
                        known.gauge_group, problem or "")
    reasons = []
    for fam in families().values():
        problem = check_family(model, fam, d, seed)
        if problem is None and gain_offset(model, fam) not in (None, fam.gain_offset):
            problem = f"its norms add {gain_offset(model, fam):g} to the gain, {fam.name}'s " \
                      f"{fam.gain_offset:g}"
        if problem is None:
            return Coverage(model_type, "candidate", fam.name, fam.gauge_group,
                            f"{fam.name}'s rules plan every tensor and preserve the function")
        reasons.append((fam.name, problem))
    planned = [(n, p) for n, p in reasons if "matches no rule" not in p]
    why = planned[0] if planned else reasons[0]
    return Coverage(model_type, "unsupported", detail=f"closest: {why[0]}: {why[1][:200]}")


def sweep(model_types: Iterable[str] | None = None, seed: int = 0) -> list[Coverage]:
    return [sweep_one(t, seed) for t in (model_types or causal_lm_types())]
