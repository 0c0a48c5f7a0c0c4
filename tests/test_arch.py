"""The architecture map: every key of every family matches exactly one rule."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from gaugefix.arch import detect_family, families, get_family
from gaugefix.errors import GaugefixError
from gaugefix.tiny import build_tiny, tiny_config

from .conftest import FAMILIES


def test_every_family_has_a_tiny_model():
    assert set(FAMILIES) == set(families())
    assert len(FAMILIES) == 19


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_and_on_disk_keys_match_exactly_one_rule(family, tmp_path):
    model = build_tiny(family, generic=False)
    fam = detect_family(model.config)
    assert fam.name == family
    plan = fam.plan(model.state_dict())  # raises on an unmatched or ambiguous key
    assert any(op.kind == "H" for op in plan.values())
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        disk_plan = fam.plan(f.keys())
    assert disk_plan


@pytest.mark.parametrize(
    "family, extra",
    [("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
     ("qwen3", {"tie_word_embeddings": True}), ("olmo", {"clip_qkv": 8.0}),
     ("mamba", {"use_bias": True}), ("gpt_neox", {"use_parallel_residual": False})],
)
def test_variants_are_covered(family, extra):
    model = build_tiny(family, generic=False, **extra)
    detect_family(model.config).plan(model.state_dict())


def test_unmatched_key_is_named():
    fam = get_family("llama")
    with pytest.raises(GaugefixError, match=r"model\.layers\.0\.mystery\.weight"):
        fam.plan(["model.embed_tokens.weight", "model.layers.0.mystery.weight"])


def test_suffix_rules_are_anchored_at_a_dot():
    gpt2 = get_family("gpt2")
    # the causal-mask buffer and the fused-attention bias must not be confused
    assert str(gpt2.op_for("h.0.attn.bias")) == "-"
    assert str(gpt2.op_for("h.0.attn.c_attn.bias")) == "-"
    assert str(gpt2.op_for("h.0.attn.c_proj.bias")) == "H(0)"
    assert str(gpt2.op_for("transformer.h.0.attn.c_attn.weight")) == "H(0)"
    llama = get_family("llama")
    assert str(llama.op_for("model.norm.weight")) == "G"
    with pytest.raises(GaugefixError):
        llama.op_for("model.layers.0.self_attn.q_norm.weight")  # not a Llama tensor


def test_unsupported_family_lists_supported_ones():
    with pytest.raises(GaugefixError, match=r"unsupported family.*'bert'.*supported: .*llama"):
        detect_family({"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(GaugefixError, match="unsupported family"):
        get_family("t5")


def test_gauge_groups_follow_the_norm():
    for name, fam in families().items():
        expected = "S_d×{±1}" if name in ("gpt2", "gpt_neox", "olmo", "stablelm", "nemotron",
                                          "starcoder2") else "B_d"
        assert fam.gauge_group == expected, name
    assert get_family("gemma2").gain_offset == 1.0


def test_tiny_config_translates_gpt2_size_names():
    cfg = tiny_config("gpt2", hidden_size=32, num_hidden_layers=3)
    assert (cfg.n_embd, cfg.n_layer) == (32, 3)
