"""Tiny offline models of every supported family, built from ``transformers`` configs.

Used by the tests, the benchmarks, the coverage sweep and the demo; nothing is downloaded.
A family listed in :data:`TINY_SPECS` is built from its hand-chosen config (the families the
tests and the demo have trained since the start); any other family from its first model
type's own config class, shrunk by :func:`shrunk_config`. So a family added to the table
needs no entry here unless its config needs structure a shrink leaves out (:data:`STRUCTURE`).
Norm gains start at 1.0 (a degenerate, O(d) gauge); :func:`perturb_norms` makes them generic.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import torch

from .arch import get_family
from .errors import GaugefixError

_DECODER = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, kwargs) of the tiny models (README.md: Adding a family).
TINY_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_DECODER}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {**_DECODER, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_DECODER, "head_dim": 16, "sliding_window": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**_DECODER, "head_dim": 16, "sliding_window": 32}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, **_TOKENS}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {**_DECODER, **_TOKENS}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**_DECODER, **_TOKENS}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {**_DECODER, **_TOKENS}),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {**_DECODER, **_TOKENS}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {**_DECODER, **_TOKENS}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                  bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=128, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0)),
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                   conv_kernel=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
}

# attribute -> tiny value, set where a config has the attribute
TINY_SIZES: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64,
    "intermediate_size": 128, "ffn_hidden_size": 128, "n_inner": 128, "ffn_dim": 128,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "multi_query_group_num": 2, "head_dim": 16,
    "max_position_embeddings": 128, "n_positions": 128, "max_seq_len": 128,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "sliding_window": 32,
    # SSM heads × head size = mamba_expand (2) × hidden
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_ssm": 128,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
    "num_kv_shared_layers": 0, "laurel_rank": 8,
    "n_group": 2, "topk_group": 1,  # expert groups (DeepSeek routing) dividing 4 experts
}


def _sub_configs(cfg: Any) -> list[Any]:
    """The config and every config nested in it (text, vision, encoder, patcher, ...)."""
    from transformers import PretrainedConfig

    out, todo = [], [cfg]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(v for v in vars(c).values() if isinstance(v, PretrainedConfig))
    return out


def _has(cfg: Any, key: str) -> bool:
    """hasattr, where a per-layer attribute (which refuses a global read) counts."""
    try:
        return hasattr(cfg, key)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return True


def _per_layer_overrides(cfg: Any) -> dict[str, dict[str, Any]]:
    """``per_layer_config``: per-layer exceptions keyed by the layer's index."""
    with contextlib.suppress(Exception):
        value = cfg.to_dict().get("per_layer_config")
        if isinstance(value, dict) and all(str(k).isdigit() for k in value):
            return {str(k): dict(v) for k, v in value.items() if isinstance(v, dict)}
    return {}


def _per_layer_lists(cfg: Any, n: Any) -> dict[str, list[Any]]:
    """The config's per-layer lists (``layer_types``, ``mlp_layer_types``, a per-layer
    ``intermediate_size``, ...): attributes holding one entry per layer of the full-size
    model (``n`` layers)."""
    if not isinstance(n, int) or n <= TINY_SIZES["num_hidden_layers"]:
        return {}
    out = {}
    for key in dir(cfg):
        if key.startswith("_"):
            continue
        with contextlib.suppress(Exception):
            value = getattr(cfg, key)
            if isinstance(value, list | tuple) and len(value) == n:
                out[key] = list(value)
    return out


def _one_layer_of_each_kind(cfg: Any, n_layers: Any, overrides: dict[str, dict[str, Any]]
                            ) -> None:
    """Keep one layer of each kind the per-layer lists name (attention, SSM, MoE, ...), the
    first two and the last (models constrain it: Gemma 4's is full attention), and carry the
    per-layer lists and ``per_layer_config`` exceptions over to the kept layers."""
    per_layer = _per_layer_lists(cfg, n_layers)  # sizes in them already shrunk
    if not per_layer:
        return
    keep: set[int] = set(range(TINY_SIZES["num_hidden_layers"])) | {n_layers - 1}
    for values in per_layer.values():
        first = {repr(v): i for i, v in reversed(list(enumerate(values)))}
        if len(first) <= 4:  # kinds of layer, not per-layer values (indices, sizes)
            keep.update(first.values())
    kept = sorted(keep)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        cfg.num_hidden_layers = len(kept)
    for key, values in sorted(per_layer.items(), key=lambda kv: kv[0] != "layer_types"):
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            setattr(cfg, key, [values[i] for i in kept])
    if overrides:  # per-layer exceptions (Gemma 4's wider full-attention heads)
        width = len(next(iter(overrides)))
        cfg.per_layer_config = {
            f"{new:0{width}d}": {k: 2 * TINY_SIZES[k] if k == "head_dim" else
                                 TINY_SIZES.get(k, v) for k, v in o.items()}
            for new, old in enumerate(kept) if (o := overrides.get(f"{old:0{width}d}"))}


def shrunk_config(model_type: str) -> Any:
    """The model type's own config, shrunk to tiny sizes where it (or a config nested in it)
    has them."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    for target in _sub_configs(cfg):
        n_layers = getattr(target, "num_hidden_layers", None)
        overrides = _per_layer_overrides(target)
        for key, value in TINY_SIZES.items():
            if _has(target, key):
                with contextlib.suppress(Exception):
                    current = getattr(target, key)  # a per-layer list stays a list
                    setattr(target, key, [value] * len(current)
                            if isinstance(current, list) and value is not None else value)
        _one_layer_of_each_kind(target, n_layers, overrides)
        if hasattr(target, "qk_rope_head_dim") and hasattr(target, "qk_nope_head_dim"):
            # MLA: derived sizes the config computed from the originals
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                target.qk_head_dim = target.qk_rope_head_dim + target.qk_nope_head_dim
                target.head_dim = target.qk_rope_head_dim
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(target, key, None)
            if isinstance(v, int) and v >= TINY_SIZES["vocab_size"]:
                setattr(target, key, 0)
    for path, value in STRUCTURE.get(model_type, {}).items():
        *parents, last = path.split(".")
        target = cfg
        for name in parents:
            target = getattr(target, name)
        setattr(target, last, value)
    return cfg


# structure a tiny config would otherwise leave out (dotted paths into nested configs)
STRUCTURE: dict[str, dict[str, Any]] = {
    "mllama": {"text_config.cross_attention_layers": [1]},  # its cross-attention layers
    "gemma3": {"vision_config.image_size": 64, "mm_tokens_per_image": 4,  # 4×4 patches → 2×2
               "image_token_id": 127, "image_token_index": 127, "boi_token_index": 126,
               "eoi_token_index": 125},
    "opt": {"word_embed_proj_dim": 64},  # OPT-350m's embedding projection is not mapped
    "gptj": {"rotary_dim": 8}, "codegen": {"rotary_dim": 8},  # at most the head size 16
    "mamba2": {"num_heads": 8},  # heads × head_dim (16) = expand (2) × hidden
    # hybrid stacks whose default config has no attention layer: give them one
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    # Zamba2's shared block reads [hidden, embeddings]: twice the hidden size
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32, "mamba_headdim": 16,
               "hybrid_layer_ids": [2]},  # its shrunk layers: mamba, mamba, hybrid, mamba
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},  # as released
    "gpt_neo": {"attention_types": [[["global", "local"], 1], [["local"], 1]]},  # = its layers
}
MAX_PARAMETERS = 20_000_000  # a tiny config that still builds more is refused, not built




# Keyword names for the common sizes, per config class family.
_SIZE_KEYS = {
    "gpt2": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"},
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """A transformers config for a tiny model of ``family``; ``overrides`` win.

    Common size names (``hidden_size``, ``num_hidden_layers``, ...) are translated
    for GPT-2 (``n_embd``, ``n_layer``, ...).
    """
    import transformers

    fam = get_family(family)
    if fam.name not in TINY_SPECS:
        cfg = shrunk_config(fam.model_types[0])
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise GaugefixError(f"{type(cfg).__name__} has no attribute {key!r}")
            setattr(cfg, key, value)
        return cfg
    cfg_cls, _, kwargs = TINY_SPECS[fam.name]
    names = _SIZE_KEYS.get(fam.name, {})
    kw = {**kwargs, **{names.get(k, k): v for k, v in overrides.items()}}
    return getattr(transformers, cfg_cls)(**kw)


def build_tiny(family: str, seed: int = 0, *, generic: bool = True, scale: float = 0.5,
               **overrides: Any) -> torch.nn.Module:
    """A tiny random model in eval mode; ``generic`` perturbs its norm parameters."""
    import transformers

    fam = get_family(family).name
    config = tiny_config(fam, **overrides)
    torch.manual_seed(seed)
    if fam in TINY_SPECS:
        model = getattr(transformers, TINY_SPECS[fam][1])(config).eval()
    else:
        with _quiet():
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if generic:
        perturb_norms(model, seed=seed, scale=scale)
    return model


def perturb_norms(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Add ``scale * N(0, 1)`` to every residual norm gain and LayerNorm bias (in place)."""
    from .arch import detect_family

    fam = detect_family(model.config)
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if fam.op_for(key).kind in ("G", "LB"):
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
                tensor.add_((scale * noise).to(tensor.dtype))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Model constructors of some families print; a tiny build should not."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
