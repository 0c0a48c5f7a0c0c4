"""PEFT LoRA / DoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

A module's role comes from its *name* through the family's architecture map
(never from shapes: q_proj and o_proj are both d×d):

| tensor | reader (q,k,v,gate,up, lm_head, c_attn, c_fc) | writer (o_proj, down_proj, c_proj) |
|---|---|---|
| ``lora_A.weight`` [r, in] | H(1) | – |
| ``lora_B.weight`` [out, r] (and ``lora_B.bias``) | – | H(0) |
| ``lora_magnitude_vector`` [out] (DoRA) | – (row norms over the input are invariant) | unsigned |
| ``lora_embedding_A`` [r, V] / ``lora_embedding_B`` [d, r] | – / H(0) | |

Full tensors saved with the adapter (``base_layer`` weights of targeted embeddings,
``modules_to_save``) take the family's own op.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..arch import Family, Op, Rule
from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_dir, copy_files, read_json
from ..shards import read_layout, rewrite
from .base import GAIN, H0, H1, UNTOUCHED, one_layout, plan_names, rules, table_moves

PREFIX = "base_model.model."
LORA_KEY = re.compile(
    r"(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector"
    r"|lora_embedding_A|lora_embedding_B)$")
BASE_LAYER = re.compile(r"(?P<module>.+?)\.base_layer\.(?P<param>weight|bias)$")
MODULES_TO_SAVE = re.compile(r"(?P<module>.+?)\.modules_to_save\.(?:\w+\.)?(?P<param>weight|bias)$")

# role of the adapted module -> a table of its adapter's parts (the same dialect as a format's)
LORA_RULES: dict[str, tuple[Rule, ...]] = {
    "reader": rules([(r"lora_A\.weight", (H1,)), (r"lora_B\.(weight|bias)", UNTOUCHED),
                     ("lora_magnitude_vector", UNTOUCHED)]),
    "writer": rules([(r"lora_A\.weight", UNTOUCHED), (r"lora_B\.(weight|bias)", (H0,)),
                     ("lora_magnitude_vector", (GAIN,))]),
    "embedding": rules([("lora_embedding_A", UNTOUCHED), ("lora_embedding_B", (H0,))]),
    # a map from the residual stream to itself (HH): B·A moves as P·B·A·Pᵀ
    "residual map": rules([(r"lora_A\.weight", (H1,)), (r"lora_B\.(weight|bias)", (H0,)),
                           ("lora_magnitude_vector", (GAIN,))]),
    "other": rules([(r"lora_A\.weight|lora_B\.(weight|bias)|lora_magnitude_vector",
                     UNTOUCHED)]),
}


def lora_ops(key: str, family: Family) -> tuple[Op, ...]:
    name = key.removeprefix(PREFIX)
    m = LORA_KEY.fullmatch(name)
    if m is not None:
        module, part = m["module"], m["part"]
        role = "embedding" if part.startswith("lora_embedding") else family.role(
            f"{module}.weight")
        return plan_names([part], LORA_RULES[role], f"lora: {key} ({role} module)")[part]
    for pattern in (BASE_LAYER, MODULES_TO_SAVE):
        m = pattern.fullmatch(name)
        if m is not None:
            name = f"{m['module']}.{m['param']}"
            break
    op = family.op_for(name)
    return (op,) if op.residual_axis is not None else UNTOUCHED


def resolve_family(adapter_cfg: dict[str, Any], model: str | Path | None,
                   family: str | None) -> Family:
    from ..arch import get_family
    from ..checkpoint import Checkpoint

    if family is not None:
        return get_family(family)
    if model is not None:  # a checkpoint directory, a GGUF file, a hub id
        from ..model import open_model

        return open_model(model).family
    base = adapter_cfg.get("base_model_name_or_path")
    if isinstance(base, str) and base and (Path(base) / "config.json").is_file():
        return Checkpoint.open(base).family
    raise GaugefixError("lora: cannot tell the base model's family; pass --model BASE_DIR or "
                        "--family NAME")


def transport_lora(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                   record: dict[str, Any], overwrite: bool = False,
                   model: str | Path | None = None, family: str | None = None
                   ) -> dict[str, Any]:
    src, dst = Path(src), Path(dst)
    cfg_file, weights = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not src.is_dir() or not cfg_file.is_file():
        raise GaugefixError(f"lora: {src} is not a PEFT adapter folder (no adapter_config.json)")
    one_layout(src, "lora", {f"{name} weights": [f"adapter_model.{suffix}"] for name, suffix in
                             (("safetensors", "safetensors"), ("pickled", "bin"))
                             if (src / f"adapter_model.{suffix}").is_file()})
    if not weights.is_file():
        if (src / "adapter_model.bin").is_file():
            raise GaugefixError(f"lora: {src} holds a pickled adapter_model.bin; re-save it as "
                                "safetensors (gaugefix never unpickles)")
        raise GaugefixError(f"lora: {src} has no adapter_model.safetensors")
    cfg = read_json(cfg_file, "PEFT adapter config")
    if cfg.get("peft_type") != "LORA":
        raise GaugefixError(f"lora: peft_type is {cfg.get('peft_type')!r}; only LORA (incl. DoRA) "
                            "adapters are supported")
    fam = resolve_family(cfg, model, family)
    fam.check_gauge(gauge)
    files = read_layout(weights, "adapter weights file")
    plan = {e.name: lora_ops(e.name, fam) for e in files.entries}
    moves = table_moves(files, plan, gauge, "lora")
    with atomic_dir(dst, overwrite=overwrite, inputs=(src,)) as tmp:
        copy_files(src, tmp, {weights.name})
        rewrite(weights, tmp / weights.name, moves,
                metadata={**files.metadata, "gaugefix": json.dumps(record)})
    return {"family": fam.name, "tensors": len(plan),
            "transformed": sum(1 for v in plan.values() if v)}
