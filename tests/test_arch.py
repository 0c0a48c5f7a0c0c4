"""The architecture map: every key of every family matches exactly one rule."""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
import torch
from safetensors import safe_open

from gaugefix.arch import detect_family, families, get_family, validate_table
from gaugefix.errors import GaugefixError
from gaugefix.tiny import build_tiny, tiny_config

from .conftest import FAMILIES


def test_every_family_of_the_table_is_tested():
    assert set(FAMILIES) == set(families())
    assert len(FAMILIES) >= 50


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


@pytest.mark.parametrize("family", FAMILIES)
def test_the_norm_behaviour_is_what_the_model_s_norm_does(family):
    """The table's norm behaviours against the model's own norm modules: mean subtraction
    (a constant added to every coordinate is removed, and the group is S_d×{±1}), the gain
    offset (a zero stored gain outputs zero unless the norm scales by 1 + w)."""
    fam = get_family(family)
    model = build_tiny(family, generic=False)
    leaf = {n for n, m in model.named_modules() if not list(m.children())}
    gains = [k for k in model.state_dict()
             if fam.op_for(k).kind == "G" and k.rsplit(".", 1)[0] in leaf]
    assert bool(gains) == fam.norm_spec.gain
    assert fam.gauge_group == ("S_d×{±1}" if fam.norm_spec.mean_subtracting else "B_d")
    if not gains:
        return
    module = model.get_submodule(gains[0].rsplit(".", 1)[0])
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shifted = (module(x + 3.0) - module(x)).abs().max() / module(x).abs().max()
        assert (float(shifted) < 1e-4) == fam.norm_spec.mean_subtracting, float(shifted)
        module.weight.zero_()
        zero_gain = float(module(x).abs().max())
    assert (zero_gain > 1e-3) == (fam.gain_offset == 1.0), zero_gain


def test_the_table_is_validated_with_every_problem_at_once():
    doc = json.loads(resources.files("gaugefix.arch").joinpath("families.json").read_text())
    assert validate_table(doc).families.keys() == families().keys()
    bad = copy.deepcopy(doc)
    bad["families"]["llama"]["norm"] = "rmsnrom"
    bad["families"]["llama"]["rule_sets"].append("atn")
    bad["families"]["mistral"]["model_types"] = ["llama"]
    bad["families"]["qwen2"]["colour"] = "blue"
    bad["rule_sets"]["attn"][0][0] = "self_attn\\.(q"
    bad["norms"]["rmsnorm"]["mean_subtracting"] = "sometimes"
    with pytest.raises(GaugefixError) as exc:
        validate_table(bad)
    msg = str(exc.value)
    for needle in ("rmsnrom", "'atn'", "'llama' is in families", "colour", "not a regex",
                   "mean_subtracting"):
        assert needle in msg, (needle, msg)
    unused = copy.deepcopy(doc)
    unused["rule_sets"]["spare"] = [["x\\.weight", "-", None]]
    with pytest.raises(GaugefixError, match="used by no family: spare"):
        validate_table(unused)
    lb = copy.deepcopy(doc)
    lb["families"]["llama"]["rule_sets"].append("layernorm_biases")
    with pytest.raises(GaugefixError, match=r"norm bias .* has no bias"):
        validate_table(lb)


def test_every_unmatched_key_is_reported_at_once_with_layers_collapsed():
    fam = get_family("llama")
    keys = ["model.embed_tokens.weight", *(f"model.layers.{i}.mystery.weight" for i in range(4)),
            "model.layers.0.self_attn.q_norm.weight", "model.extra"]
    with pytest.raises(GaugefixError) as exc:
        fam.plan(keys)
    msg = str(exc.value)
    assert "3 tensor name(s) match no rule" in msg
    assert "model.layers.{i}.mystery.weight" in msg and "model.layers.1." not in msg
    assert "model.layers.0.self_attn.q_norm.weight" in msg and "model.extra" in msg


def test_a_model_type_without_a_gauge_is_refused_with_the_reason():
    with pytest.raises(GaugefixError, match=r"'xglm' admits no residual gauge: .*sinusoidal"):
        detect_family({"model_type": "xglm", "architectures": ["XGLMForCausalLM"]})
    with pytest.raises(GaugefixError, match="admits no residual gauge"):
        get_family("ctrl")


def test_tiny_config_translates_gpt2_size_names():
    cfg = tiny_config("gpt2", hidden_size=32, num_hidden_layers=3)
    assert (cfg.n_embd, cfg.n_layer) == (32, 3)


def test_the_cli_refuses_a_model_without_a_gauge_in_one_line(tmp_path, cli):
    from transformers import AutoModelForCausalLM

    from gaugefix.tiny import shrunk_config

    AutoModelForCausalLM.from_config(shrunk_config("xglm")).save_pretrained(tmp_path / "xglm")
    res = cli("apply", tmp_path / "xglm", tmp_path / "B", "--random", 1, ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: model_type 'xglm' admits no residual gauge: adds a fixed "
                               "sinusoidal position encoding")
    assert not (tmp_path / "B").exists()


def test_a_residual_map_moves_on_both_axes():
    """HH: a d×d map from the residual stream to itself (Gemma 3n's AltUp projections)
    becomes P·W·Pᵀ with signs on both sides; the op takes no axis."""
    from gaugefix.arch import Op
    from gaugefix.group import SignedPerm

    g = SignedPerm.random(8, seed=1, positive_fraction=0.5)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    hh = Op("HH")
    assert hh.axes == (0, 1) and hh.signed
    assert torch.equal(hh(g, w), g.apply(g.apply(w, 0), 1))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(g.apply(x @ w.T, -1), g.apply(x, -1) @ hh(g, w).T, atol=1e-6)
    with pytest.raises(GaugefixError, match="takes no axis"):
        Op("HH", 0)
    fam = detect_family({"model_type": "gemma3n_text"})
    assert fam.op_for("model.altup_projections.0.weight") == hh
    assert fam.role("model.altup_projections.0.weight") == "residual map"


def test_a_concatenation_of_streams_moves_block_by_block():
    """An axis holding [h, e] (Zamba2's shared block reads the hidden state and the
    embeddings side by side) moves by the gauge in each block: the tiled gauge."""
    from gaugefix.arch import Op
    from gaugefix.group import SignedPerm

    g = SignedPerm.random(8, seed=4, positive_fraction=0.5)
    h, e = (torch.randn(3, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    reader = Op("H", 1, blocks=2)
    x = torch.cat([h, e], -1)
    moved_x = torch.cat([g.apply(h, -1), g.apply(e, -1)], -1)
    assert torch.allclose(moved_x @ reader(g, w).T, x @ w.T, atol=1e-6)
    assert g.tiled(2).tiled(1) == g.tiled(2) and g.tiled(2).d == 16
    assert str(reader) == "H(1)×2"
    with pytest.raises(GaugefixError, match="cannot have 2 blocks"):
        Op("LB", None, 2)


def test_a_lora_on_a_residual_map_moves_on_both_sides():
    """PEFT's B·A on an HH module (Gemma 3n's AltUp projection) moves as P·B·A·Pᵀ: A on its
    input (H1), B on its output (H0), in the same rule dialect as every format's tables."""
    from gaugefix.arch import Op
    from gaugefix.group import SignedPerm
    from gaugefix.transport.lora import lora_ops

    fam = detect_family({"model_type": "gemma3n_text"})
    key = "base_model.model.model.altup_projections.1.{}.weight"
    ops_a, ops_b = lora_ops(key.format("lora_A"), fam), lora_ops(key.format("lora_B"), fam)
    g = SignedPerm.random(8, seed=8, positive_fraction=0.5)
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen)
    moved_a, moved_b = ops_a[0](g, a), ops_b[0](g, b)
    assert torch.allclose(moved_b @ moved_a, Op("HH")(g, b @ a), atol=1e-6)
    with pytest.raises(GaugefixError, match="match no rule"):
        lora_ops("base_model.model.model.altup_projections.1.lora_C.weight", fam)
