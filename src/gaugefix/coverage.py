"""Which causal-LM model types of the installed transformers gaugefix moves exactly: a sweep.

For every model type in transformers' causal-LM mapping, a tiny random config is built from
the model type's own config class (sizes shrunk where the config has them), the model is
instantiated offline, and classified:

* ``supported`` — its family is in the architecture map; a random gauge of the family's group
  is applied and an independent check compares logits and every hidden state;
* ``failed`` — its family is in the map, but the check fails (a defect of the map);
* ``candidate`` — not in the map, but one family's rules plan every tensor and the check
  passes: the rules fit, the model type can be added to that family (as data);
* ``refused`` — its residual stream admits no signed-permutation gauge; the table says why,
  and the sweep checks it (its tensors planned, a random gauge changes the function);
* ``not mapped`` — not in the map, and no family's rules both plan it and pass the check
  (the closest family and the tensor names its rules leave unplanned, or why the check fails);
* ``not a decoder`` — an encoder or encoder-decoder model registered for causal LM;
* ``not buildable offline`` — its config or model cannot be built here (the error).

An unknown tensor is never skipped: planning fails on it, and the sweep says which.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .arch import Family, collapse_layers, families, hidden_size_of, refusal, refused_rules
from .errors import GaugefixError
from .group import SignedPerm
from .tiny import MAX_PARAMETERS, shrunk_config

# encoder models registered for causal LM (a model type, or the prefix of a family of them)
DECODER_ONLY_EXCLUDE = re.compile(
    r"bert|bert-generation|big_bird|camembert|data2vec-text|electra|ernie|megatron-bert"
    r"|prophetnet|reformer|rembert|roberta|roberta-prelayernorm|roc_bert|roformer|xlm"
    r"|xlm-roberta|xlm-roberta-xl|xlnet|xmod")


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


def _generic(model: torch.nn.Module, seed: int) -> None:
    """Every tensor that starts constant (norm gains at 1, biases and projectors at 0, ...)
    made generic, whatever the rules under test call it: a constant vector is invariant under
    permutations, so a gain a wrong rule leaves untouched would otherwise pass the check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if (tensor.is_floating_point() and tensor.numel() > 1
                    and bool((tensor == tensor.reshape(-1)[0]).all())):
                tensor.add_(0.5 * torch.randn(tensor.shape, generator=gen).to(tensor.dtype))


def saved_names(model: torch.nn.Module) -> list[str]:
    """The tensor names ``save_pretrained`` writes (fused experts may be saved per expert)."""
    import tempfile
    from pathlib import Path

    from safetensors import safe_open

    names: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(tmp)
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                names.extend(h.keys())
    return names


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
    try:
        names = saved_names(model)  # transformers may save another layout than it holds
    except Exception as exc:
        return f"cannot be saved ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    try:
        fam.plan(names)
    except GaugefixError as exc:
        return f"as saved: {exc}"
    a = copy.deepcopy(model)
    _generic(a, seed)
    g = _group_gauge(fam, d, seed + 1)
    try:
        b = gauge_model(a, g, family=fam)
        vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 128
        ids = probe_tokens(min(int(vocab), 128), 64, 16, seed=seed)
        rep = compare_models(a, b, g, ids)
    except Exception as exc:  # the model itself may fail on a wrong plan: any error
        return f"{type(exc).__name__}: {exc}"
    worst = rep.max_rel_err
    if not worst <= tol:
        return f"function changed (relative error {worst:.2e})"
    return None


def _offset_problem(model: torch.nn.Module, fam: Family) -> str | None:
    """What is wrong with ``fam``'s gain offset for this model, if anything."""
    offset = gain_offset(model, fam)
    if offset in (None, fam.gain_offset):
        return None
    return (f"its norms add {offset:g} to the stored gain; {fam.name}'s norm {fam.norm!r} "
            f"adds {fam.gain_offset:g}")


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


def towers(cfg: Any) -> list[str]:
    """The non-text sub-configs (vision, audio, ...) a multimodal config class declares, set
    or not (a tiny default may leave the vision tower out; real checkpoints have it)."""
    from transformers import PretrainedConfig

    declared = set(getattr(type(cfg), "sub_configs", None) or {})
    present = {k for k, v in vars(cfg).items() if isinstance(v, PretrainedConfig)}
    return sorted((declared | present) - {"text_config"})


def sweep_one(model_type: str, seed: int = 0) -> Coverage:
    from transformers import AutoModelForCausalLM

    if DECODER_ONLY_EXCLUDE.fullmatch(model_type):
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
    try:
        d = hidden_size_of(model.config)
    except GaugefixError as exc:
        return Coverage(model_type, "not buildable offline", detail=str(exc))
    why = refusal(model_type)
    if why is not None:  # the reason is checked: its tensors planned, a gauge breaks it
        problem = check_family(model, refused_rules(model_type), d, seed)
        if problem is None or not problem.startswith("function changed"):
            outcome = "preserves the function" if problem is None else f"fails: {problem}"
            return Coverage(model_type, "failed",
                            detail=f"refused ({why}), but a gauge through its rules {outcome}")
        return Coverage(model_type, "refused", detail=f"{why} (checked: {problem})")
    known = next((f for f in families().values() if model_type in f.model_types), None)
    if known is not None:
        problem = check_family(model, known, d, seed) or _offset_problem(model, known)
        return Coverage(model_type, "failed" if problem else "supported", known.name,
                        known.gauge_group, problem or "")
    unplanned: dict[str, list[str]] = {}
    for fam in families().values():
        problem = check_family(model, fam, d, seed) or _offset_problem(model, fam)
        if problem is None and towers(cfg):
            return Coverage(model_type, "not mapped", detail=(
                f"multimodal ({', '.join(towers(cfg))}): its text model fits {fam.name}'s "
                "rules, but no family declares its towers (their tensors would be matched "
                "by name)"))
        if problem is None:
            return Coverage(model_type, "candidate", fam.name, fam.gauge_group,
                            f"{fam.name}'s rules plan every tensor and preserve the function")
        unplanned[fam.name] = list(dict.fromkeys(
            collapse_layers(k) for k in model.state_dict() if not fam.match(k)))
        if not unplanned[fam.name]:
            return Coverage(model_type, "not mapped", detail=(
                f"{fam.name}'s rules plan every tensor, but {problem[:240]}"))
    best = min(unplanned, key=lambda n: len(unplanned[n]))
    names = unplanned[best]
    return Coverage(model_type, "not mapped", detail=(
        f"closest: {best}'s rules leave {len(names)} tensor name(s) unplanned: "
        f"{', '.join(names[:6])}{', …' if len(names) > 6 else ''}"))


def sweep(model_types: Iterable[str] | None = None, seed: int = 0) -> list[Coverage]:
    return [sweep_one(t, seed) for t in (model_types or causal_lm_types())]
