"""Exact gauge action on real transformers checkpoints of every family."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gaugefix.apply import gauge_model, gauge_state_dict
from gaugefix.arch import detect_family, get_family
from gaugefix.group import SignedPerm
from gaugefix.testing import force_gauge, rotate_dense
from gaugefix.tiny import build_tiny
from gaugefix.verify import compare_models, probe_tokens

from .conftest import FAMILIES, LAYERNORM_FAMILIES


def tolerance(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """What float32 rounding can do to this model's logits: a gauge reorders sums, which
    perturbs each weight's contribution by about an ulp. A tiny random model may amplify that
    a lot (Gemma 4 turns a 1e-7 relative weight noise into 1e-4 of its logits), so the bound
    is measured, not assumed: 20× the effect of 1e-7 relative weight noise, at least 1e-5. A
    wrong gauge changes logits by order one (the group test below asserts > 1e-2)."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen).to(p.dtype))
        a, b = model(ids).logits, noisy(ids).logits
    return max(1e-5, 20 * float((a - b).abs().max() / a.abs().max()))


def _load_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_random_then_verify_from_the_cli(family, tiny_ckpt, tmp_path, cli):
    src = tiny_ckpt(family, seed=1)
    dst, back = tmp_path / "B", tmp_path / "A-again"
    g_path, inv_path = tmp_path / "g.json", tmp_path / "inv.json"

    cli("apply", src, dst, "--random", 11, "--gauge-out", g_path)
    tol = tolerance(AutoModelForCausalLM.from_pretrained(src), probe_tokens(128, 128, 64))
    res = cli("verify", src, dst, "--gauge", g_path, "--tol", str(tol), "--json")
    report = json.loads(res.stdout)
    assert report["passed"] and report["max_rel_err"] < tol, report
    layers = AutoModelForCausalLM.from_pretrained(src).config.get_text_config().num_hidden_layers
    assert len(report["hidden_rel_err"]) == layers + 1  # embeddings + layers, all moved

    doc = json.loads(g_path.read_text())
    assert doc["source"]["blake3"] != doc["target"]["blake3"]
    gauge = SignedPerm.load(g_path)
    if family in LAYERNORM_FAMILIES:
        assert gauge.global_sign is not None  # --random draws from S_d x {±1}
    else:
        assert 0 < gauge.positive_fraction < 1

    # the output is an ordinary checkpoint
    model_b = AutoModelForCausalLM.from_pretrained(dst)
    assert detect_family(model_b.config).name == family

    # apply, then apply the inverse: bit-identical tensors, same names and dtypes
    gauge.inverse().save(inv_path)
    cli("apply", dst, back, "--gauge", inv_path)
    a, a2 = _load_all(src), _load_all(back)
    assert a.keys() == a2.keys()
    for k in a:
        assert a[k].dtype == a2[k].dtype
        assert torch.equal(a[k].reshape(-1).view(torch.uint8),
                           a2[k].reshape(-1).view(torch.uint8)), k
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            assert (back / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_api(family):
    model = build_tiny(family, seed=2)
    fam = detect_family(model.config)
    g = SignedPerm.random(64, seed=5, kind="signed" if fam.allows_signs else "global")
    model_b = gauge_model(model, g)
    ids = probe_tokens(128, 128, 64)
    rep = compare_models(model, model_b, g, ids)
    assert rep.max_rel_err < tolerance(model, ids), rep
    # the original is untouched; state-dict API agrees with the module API
    sd_b = gauge_state_dict(model.state_dict(), g, fam)
    for k, v in model_b.state_dict().items():
        assert torch.equal(v, sd_b[k]), k


def test_tied_embeddings_are_transformed_once_and_stay_tied():
    model = build_tiny("gemma", seed=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    g = SignedPerm.random(64, seed=1)
    model_b = gauge_model(model, g)
    assert model_b.lm_head.weight.data_ptr() == model_b.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model_b.lm_head.weight, g.apply(model.lm_head.weight, 1))
    sd = gauge_state_dict(model.state_dict(), g, "gemma")
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_table_states_the_group_the_model_computes(family):
    """The architecture map's group (B_d or S_d×{±1}) against the real transformers model:
    a permutation with a global sign preserves every family's function; per-coordinate
    signs preserve it exactly when the table says B_d, and change it (not by rounding, by
    order one) when it says S_d×{±1}."""
    model = build_tiny(family, seed=3)
    ids = probe_tokens(128, 128, 64)
    per_coord = SignedPerm.random(64, seed=4, positive_fraction=0.5)
    global_neg = SignedPerm(per_coord.perm, -np.ones(64, dtype=np.int64))
    kept = compare_models(model, force_gauge(model, global_neg), global_neg, ids)
    signed = compare_models(model, force_gauge(model, per_coord), per_coord, ids)
    tol = tolerance(model, ids)
    assert tol < 5e-3 and kept.max_rel_err < tol, kept  # well below the O(1) of a wrong gauge
    if get_family(family).allows_signs:
        assert signed.max_rel_err < tol, signed
    else:
        assert signed.logits_rel_err > 1e-2, signed


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_rmsnorm_at_init_has_an_orthogonal_gauge(family, tiny_ckpt, cli):
    model = build_tiny(family, seed=6, generic=False)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    ids = probe_tokens(128, 128, 64)
    with torch.no_grad():
        la = model(ids, output_hidden_states=True)
        lb = rotate_dense(model, q)(ids, output_hidden_states=True)
    rel = (lb.logits - la.logits).abs().max() / la.logits.abs().max()
    assert rel < 1e-5
    hidden = torch.einsum("ij,btj->bti", q.float(), la.hidden_states[1])
    assert torch.allclose(lb.hidden_states[1], hidden, atol=1e-4)

    # with generic gains the same rotation breaks the function
    generic = build_tiny(family, seed=6, generic=True)
    with torch.no_grad():
        lg = generic(ids).logits
        lr = rotate_dense(generic, q)(ids).logits
    assert ((lr - lg).abs().max() / lg.abs().max()) > 1e-2

    # and inspect warns about it
    res = cli("inspect", tiny_ckpt(family, seed=6, generic=False))
    assert "O(d)" in res.stderr and "ill-posed" in res.stderr
    res = cli("inspect", tiny_ckpt(family, seed=6, generic=True, name="generic"), "--json")
    rep = json.loads(res.stdout)
    assert rep["warnings"] == [] and rep["n_tied_coordinates"] == 0
    assert rep["gauge_group"] == "B_d" and rep["norm"] == get_family(family).norm
    assert rep["norm"].startswith("rmsnorm")


def test_inspect_reports_layernorm_groups_and_partial_ties(tiny_ckpt, cli, tmp_path):
    rep = json.loads(cli("inspect", tiny_ckpt("gpt2"), "--json").stdout)
    assert rep["gauge_group"] == "S_d×{±1}" and rep["norm"] == "layernorm"
    olmo = cli("inspect", tiny_ckpt("olmo"))
    assert "non-parametric LayerNorm" in olmo.stdout
    assert "O(d−1)" in olmo.stderr

    model = build_tiny("llama", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p[5] = p[9]  # coordinates 5 and 9 tie in every norm
    model.save_pretrained(tmp_path / "tied")
    rep = json.loads(cli("inspect", tmp_path / "tied", "--json").stdout)
    assert rep["tie_groups"] == [[5, 9]] and rep["min_separation"] == 0.0
    assert "O(k)" in rep["warnings"][0]


def test_sharded_checkpoint_round_trips(tmp_path, cli):
    model = build_tiny("llama", seed=1, hidden_size=128, intermediate_size=256)
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (src / "model.safetensors.index.json").exists()

    cli("apply", src, tmp_path / "B", "--random", 3, "--gauge-out", tmp_path / "g.json")
    assert sorted(p.name for p in (tmp_path / "B").glob("model-*.safetensors")) == [
        p.name for p in shards
    ]
    assert (tmp_path / "B" / "model.safetensors.index.json").read_bytes() == (
        src / "model.safetensors.index.json").read_bytes()
    cli("verify", src, tmp_path / "B", "--gauge", tmp_path / "g.json", "--tol", "1e-5")
    SignedPerm.load(tmp_path / "g.json").inverse().save(tmp_path / "inv.json")
    cli("apply", tmp_path / "B", tmp_path / "A2", "--gauge", tmp_path / "inv.json")
    a, a2 = _load_all(src), _load_all(tmp_path / "A2")
    assert all(torch.equal(a[k], a2[k]) for k in a)


def test_hub_layout_gpt2_without_prefix_and_with_mask_buffers(tmp_path, cli):
    """Hub gpt2 files: no `transformer.` prefix, `h.{i}.attn.bias` buffers, no lm_head."""
    from safetensors.torch import save_file

    model = build_tiny("gpt2", seed=2)
    src = tmp_path / "hub-gpt2"
    model.save_pretrained(src)
    sd = load_file(src / "model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    mask = torch.tril(torch.ones(128, 128, dtype=torch.uint8)).view(1, 1, 128, 128)
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = mask.clone()
    save_file(hub, src / "model.safetensors", metadata={"format": "pt"})

    cli("apply", src, tmp_path / "B", "--random", 5, "--gauge-out", tmp_path / "g.json")
    out = load_file(tmp_path / "B" / "model.safetensors")
    assert torch.equal(out["h.0.attn.bias"], hub["h.0.attn.bias"])
    cli("verify", src, tmp_path / "B", "--gauge", tmp_path / "g.json", "--tol", "1e-5")
