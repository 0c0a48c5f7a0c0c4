"""Optimizer state: a torch ``state_dict`` (``optimizer.pt``) or an HF Trainer checkpoint.

Adam-type updates are elementwise, so they commute with signed permutations:
``exp_avg`` (first moment) transforms exactly like its parameter, ``exp_avg_sq``
and ``max_exp_avg_sq`` (second moments) with the unsigned version of the same
gather, ``step`` not at all. (Exact for signed permutations only: elementwise
second moments do not rotate.)

A state dict stores integer ids, not names. They run consecutively across
parameter groups in group order; the names are recovered from ``param_names``
when the optimizer was built from named parameters, else by rebuilding the
groups: one group in ``named_parameters()`` order, or the HF Trainer's two
groups (decay parameters, then the rest, each in ``named_parameters()`` order,
trainable only), using the Trainer's own rule for which parameters decay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..arch import Family
from ..checkpoint import Checkpoint
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_dir, atomic_file, check_regular, copy_files, torch_load
from .base import TORCH_SUFFIXES, check_suffix, no_record

# state key -> signed (like the parameter) / unsigned / untouched
STATE_TABLE: dict[str, str] = {
    "exp_avg": "signed",
    "momentum_buffer": "signed",
    "exp_avg_sq": "unsigned",
    "max_exp_avg_sq": "unsigned",
    "step": "untouched",
}


def _meta_model(config_dir: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_order(sd: dict[str, Any], model: torch.nn.Module) -> list[str]:
    """Parameter names aligned with the groups' ``params`` lists, concatenated in order."""
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise GaugefixError("optim: not an optimizer state dict (no param_groups)")
    sizes = [len(g.get("params", [])) for g in groups]
    if all("param_names" in g for g in groups):
        return [n for g in groups for n in g["param_names"]]
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if len(groups) == 1:
        order = named
    elif len(groups) == 2:
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
        order = [n for n in named if n in decay] + [n for n in named if n not in decay]
        if [sum(n in decay for n in named), sum(n not in decay for n in named)] != sizes:
            raise GaugefixError(f"optim: parameter groups of sizes {sizes} do not match the HF "
                                "Trainer's decay/no-decay split of this model")
    else:
        raise GaugefixError(f"optim: {len(groups)} parameter groups without param_names; only "
                            "one group or the HF Trainer's two groups can be mapped to names")
    if len(order) != sum(sizes):
        raise GaugefixError(f"optim: the optimizer has {sum(sizes)} parameters, the model "
                            f"{len(order)} trainable ones")
    return order


def transport_state_dict(sd: dict[str, Any], names: list[str], family: Family,
                         gauge: SignedPerm) -> dict[str, Any]:
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    name_of = dict(zip(ids, names, strict=True))
    new_state: dict[Any, Any] = {}
    for pid, entry in sd.get("state", {}).items():
        op = family.op_for(name_of[pid])
        moved = {}
        for key, value in entry.items():
            rule = STATE_TABLE.get(key)
            if rule is None:
                raise GaugefixError(f"optim: unknown optimizer state {key!r} for {name_of[pid]}")
            if not isinstance(value, torch.Tensor):
                moved[key] = value
            elif rule == "untouched" or value.ndim == 0:
                # a copy: torch optimizers update `step` in place, and load_state_dict keeps
                # tensors that need no cast, so sharing would couple the two optimizers
                moved[key] = value.clone()
            else:
                moved[key] = op(gauge, value, signed=(rule == "signed"))
        new_state[pid] = moved
    return {"state": new_state, "param_groups": sd["param_groups"]}


def _load_optimizer(path: Path) -> dict[str, Any]:
    sd = torch_load(path, "optimizer state")
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise GaugefixError(f"{path}: not an optimizer state dict (needs state and "
                            "param_groups)")
    groups, state = sd["param_groups"], sd["state"]
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise GaugefixError(f"{path}: param_groups must be a list of groups with 'params'")
    ids = [i for g in groups for i in g["params"]]
    if not isinstance(state, dict) or not set(state) <= set(ids) or not all(
            isinstance(v, dict) for v in state.values()):
        raise GaugefixError(f"{path}: the optimizer state names parameters that no group "
                            "holds")
    return sd


def transport_optim(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                    record: dict[str, Any], overwrite: bool = False,
                    model: str | Path | None = None) -> dict[str, Any]:
    """``src``: an HF Trainer ``checkpoint-N/`` folder, or an ``optimizer.pt`` with ``model``
    (the checkpoint whose parameters it optimises)."""
    from ..apply import plan_checkpoint, write_gauged_weights

    src, dst = Path(src), Path(dst)
    no_record(record, "optimizer state")
    if src.is_dir():
        opt_file = src / "optimizer.pt"
        if not opt_file.is_file():
            raise GaugefixError(f"optim: {src} has no optimizer.pt (not a Trainer checkpoint)")
        ckpt = Checkpoint.open(src)
    elif src.is_file():
        if model is None:
            raise GaugefixError("optim: a bare optimizer state needs --model, the checkpoint "
                                "it belongs to")
        check_suffix(Path(dst), "a torch optimizer state", TORCH_SUFFIXES)
        from ..model import open_model

        m = open_model(model)
        if m.checkpoint is None or m.quantised:
            raise GaugefixError(f"optim: --model {model} is "
                                f"{'quantised' if m.quantised else 'not a checkpoint directory'}"
                                "; an optimizer state belongs to the float checkpoint it trains "
                                "(a quantised model's adapters are moved with the lora kind)")
        opt_file, ckpt = src, m.checkpoint
    else:  # missing, a device or a FIFO: said which
        check_regular(src, "optimizer state")
        raise GaugefixError(f"optimizer state not found: {src}")
    ckpt.family.check_gauge(gauge, ckpt.hidden_size)
    sd = _load_optimizer(opt_file)
    names = parameter_order(sd, _meta_model(ckpt.path))
    new = transport_state_dict(sd, names, ckpt.family, gauge)
    if src.is_dir():
        plan = plan_checkpoint(ckpt, gauge)
        with atomic_dir(dst, overwrite=overwrite, inputs=(src,)) as tmp:
            copy_files(src, tmp, ckpt.weight_files | {"optimizer.pt"})
            write_gauged_weights(ckpt, tmp, gauge, plan, progress=False)
            torch.save(new, tmp / "optimizer.pt")
    else:
        with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp:
            torch.save(new, tmp)
    return {"family": ckpt.family.name, "parameters": len(names),
            "states": len(new["state"])}
