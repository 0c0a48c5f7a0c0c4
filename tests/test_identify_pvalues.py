"""identify's statistical verdict (issue 21): derived when the held-out alignment test rejects
"unrelated" at level alpha; p-values in the evidence; no scale fools it; unrelated pairs'
p-values are not small."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gaugefix.apply import gauge_model
from gaugefix.canonical import identify
from gaugefix.group import SignedPerm
from gaugefix.model import open_model
from gaugefix.relation import DEFAULT_ALPHA, folds, relate
from gaugefix.tiny import build_tiny

FAMILIES = {"llama": "signed", "gpt_neox": "global"}  # B_d and S_d×{±1}


def _noisy(model, rel, seed):
    """Every weight moved by ``rel`` of its tensor's own scale (a stand-in for fine-tuning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * rel * p.std().clamp_min(1e-3))
    return model


@pytest.fixture
def saved(tmp_path):
    def save(model, name):
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    return save


@pytest.mark.parametrize("family", FAMILIES)
def test_regauged_copy_is_same_and_noisy_copies_derived_with_tiny_p(family, saved):
    a = saved(build_tiny(family, seed=3), "A")
    g = SignedPerm.random(64, seed=8, kind=FAMILIES[family])
    assert identify(a, saved(gauge_model(build_tiny(family, seed=3), g), "same")).verdict == \
        "same"
    for rel in (0.01, 0.1):
        r = identify(a, saved(gauge_model(_noisy(build_tiny(family, seed=3), rel, 1), g),
                              f"noise{rel}"))
        assert r.verdict == "derived", (rel, r.reason)
        assert r.gauge == g  # the witness
        assert r.evidence["p_value"] < 1e-20 and r.evidence["log10_p_value"] < -20
        assert r.evidence["alpha"] == DEFAULT_ALPHA
        groups = r.evidence["groups"]
        assert groups and all(v["p_value"] < 1e-3 for v in groups.values()), groups
        assert r.evidence["held_out_mean_cosine"] > 0.9
        # both halves' gauges, fitted apart, are the planted one on every coordinate
        assert r.evidence["fold_agreement_coordinates"] == 64, r.evidence
        assert r.evidence["fold_agreement_log10_p"] < -50
        assert "map 64 of 64 coordinates alike" in r.reason


@pytest.mark.parametrize("family", FAMILIES)
def test_independent_initialisations_are_unrelated(family, saved):
    a = saved(build_tiny(family, seed=3), "A")
    for seed in (9, 10):
        r = identify(a, saved(build_tiny(family, seed=seed), f"B{seed}"))
        assert r.verdict == "unrelated", r.reason
        assert r.gauge is None and r.evidence["p_value"] > DEFAULT_ALPHA


def test_a_much_smaller_initialisation_is_unrelated(tmp_path):
    """The scale defect: ‖B − g(A)‖ / max(‖A‖, ‖B‖) → 1 when B's weights are tiny, which the
    distance threshold (≤ 1.0) called derived; cosines do not see scale."""
    import transformers

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(
        tmp_path / "A")
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **cfg, initializer_range=1e-5)).save_pretrained(tmp_path / "B")
    r = identify(tmp_path / "A", tmp_path / "B")
    assert r.verdict == "unrelated", r.reason
    assert r.evidence["p_value"] > DEFAULT_ALPHA
    assert 0.99 < r.evidence["median_relative_distance"] <= 1.0  # what the old rule misread


def test_cli_alpha_and_p_values_in_json(saved, cli):
    a = saved(build_tiny("llama", seed=3), "A")
    b = saved(gauge_model(_noisy(build_tiny("llama", seed=3), 0.1, 1),
                          SignedPerm.random(64, seed=8)), "B")
    r = json.loads(cli("identify", a, b, "--json").stdout)
    assert r["verdict"] == "derived" and r["alpha"] == DEFAULT_ALPHA
    assert 0 < r["p_value"] < 1e-20 and r["groups"]
    strict = 10 ** (r["log10_p_value"] - 1)  # below the p-value: not significant there
    r2 = json.loads(cli("identify", a, b, "--json", "--alpha", strict).stdout)
    assert r2["verdict"] == "unrelated" and r2["alpha"] == pytest.approx(strict)
    assert r2["p_value"] == r["p_value"] and r2["gauge"] is None
    text = cli("identify", a, b, "--alpha", "0.01").stdout
    assert text.startswith("derived") and "p = " in text
    bad = cli("identify", a, b, "--alpha", "1.5", ok=False)
    assert bad.exit_code != 0 and "alpha" in bad.output + (bad.stderr or "")


@pytest.mark.parametrize("family", FAMILIES)
def test_false_positives_by_construction(family):
    """24 pairs of independent initialisations: none derived at the default alpha, and the
    p-values are not concentrated near 0 (the B_d bound is conservative; the S_d×{±1} normal
    z is roughly standard)."""
    models = [open_model(build_tiny(family, seed=100 + k)) for k in range(25)]
    rels = [relate(models[0], m) for m in models[1:]]
    p = np.array([r.p_value for r in rels])
    z = np.array([r.z for r in rels])
    assert (p > DEFAULT_ALPHA).all()
    assert (p < 0.01).sum() <= 1 and (p < 0.1).sum() <= 6, p
    assert np.abs(z).max() < 4 and abs(z.mean()) < 1 and 0.3 < z.std() < 2, z
    for r in rels:  # every group too
        assert min(g["p_value"] for g in r.groups.values()) > 1e-4
    # the two halves' gauges share no correspondence: they agree by chance alone (about
    # Binomial(d, 1/2d) for B_d, (d, 1/d) for S_d×{±1}: a mean of 1/2 or 1 coordinate)
    k = np.array([r.fold_agreement for r in rels])
    assert k.max() <= 5 and k.mean() <= 2, k
    assert all(r.fold_agreement_log10_p > -4 for r in rels)


def test_folds_split_layers_by_parity_and_never_leave_one_empty():
    keys = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    f = folds(keys)
    assert f["model.layers.0.mlp.down_proj.weight"] == 0
    assert f["model.layers.1.mlp.down_proj.weight"] == 1
    assert {f["model.embed_tokens.weight"], f["lm_head.weight"]} == {0, 1}
    one_layer = folds(["model.layers.0.a.weight", "model.layers.0.b.weight"])
    assert sorted(one_layer.values()) == [0, 1]


def test_statistics_are_taken_in_row_blocks(monkeypatch):
    """No float64 copy of a whole tensor: cross products and distances accumulate block by
    block, and agree with the whole-tensor float64 computation."""
    from gaugefix import relation
    from gaugefix.arch import Op

    gen = torch.Generator().manual_seed(0)
    ta = torch.randn(300, 16, generator=gen)  # an embedding: [vocab, d], residual axis 1
    tb = torch.randn(300, 16, generator=gen)
    g = SignedPerm.random(16, seed=1)
    monkeypatch.setattr(relation, "BLOCK_BYTES", 16 * 4 * 7)  # 7 rows a block: 43 blocks
    gram = relation.cross_gram(ta, tb, 1, 16)
    np.testing.assert_allclose(gram.cross, (tb.double().T @ ta.double()).numpy(), rtol=1e-5,
                               atol=1e-4)
    assert gram.norm_a == pytest.approx(float(ta.double().norm()), rel=1e-6)
    moved = g.apply(ta, 1).double()
    want = float((tb.double() - moved).norm()) / max(float(moved.norm()),
                                                      float(tb.double().norm()))
    got = relation.relative_distance(Op("H", 1), ta, tb, g, 16)
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("op", [("H", 1), ("H", 0), ("G", None)])
def test_the_moved_tensor_is_read_in_row_blocks(op, monkeypatch):
    """What the "up to quantisation" verdict rounds: g(A), a block of rows at a time, equal to
    the whole moved tensor, and its rounding noise the whole tensor's."""
    from gaugefix import relation
    from gaugefix.arch import Op
    from gaugefix.quant.gguf_file import rounding_noise, rounding_noise_parts

    o = Op(*op)
    shape = {0: (16, 96), 1: (96, 16), None: (16,)}[o.axis if o.kind == "H" else None]
    t = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    g = SignedPerm.random(16, seed=3)
    monkeypatch.setattr(relation, "BLOCK_BYTES", 4 * 96 * 5)
    rows = list(relation.moved_rows(o, t, g, 16))
    whole = o(g, t).double().numpy().reshape(-1, shape[-1])
    assert len(rows) > 1 or o.kind == "G"
    np.testing.assert_array_equal(np.concatenate(rows), whole)
    parts = np.sum([rounding_noise_parts(r, "Q4_0") for r in rows], 0)
    if o.kind != "G":
        assert np.sqrt(parts[0] / parts[1]) == pytest.approx(rounding_noise(whole, "Q4_0"))
