"""Tiny offline models of every supported family, built from ``transformers`` configs.

Used by the tests, the benchmarks and the demo; nothing is downloaded. Norm gains
start at 1.0 (a degenerate, O(d) gauge); :func:`perturb_norms` makes them generic.
"""

from __future__ import annotations

from typing import Any

import torch

from .arch import get_family
from .errors import GaugefixError

_DECODER = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, kwargs). From docs/architectures.md §7.
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

    fam = get_family(family).name
    if fam not in TINY_SPECS:
        raise GaugefixError(f"no tiny spec for family {fam!r}")
    cfg_cls, _, kwargs = TINY_SPECS[fam]
    names = _SIZE_KEYS.get(fam, {})
    kw = {**kwargs, **{names.get(k, k): v for k, v in overrides.items()}}
    return getattr(transformers, cfg_cls)(**kw)


def build_tiny(family: str, seed: int = 0, *, generic: bool = True, scale: float = 0.5,
               **overrides: Any) -> torch.nn.Module:
    """A tiny random model in eval mode; ``generic`` perturbs its norm parameters."""
    import transformers

    fam = get_family(family).name
    config = tiny_config(fam, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, TINY_SPECS[fam][1])(config).eval()
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
