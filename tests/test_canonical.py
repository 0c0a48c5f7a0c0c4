"""Canonical charts: gauge-equivalent checkpoints canonicalize to byte-identical weight files,
for every family; what the weights leave open is reported; no chart where none exists."""

from __future__ import annotations

import pytest
import torch

from gaugefix.apply import gauge_checkpoint, gauge_model
from gaugefix.arch import get_family
from gaugefix.canonical import canonical_chart, canonicalize
from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.tiny import build_tiny

from .conftest import FAMILIES


def _weights(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def _kind(family):
    return "signed" if get_family(family).allows_signs else "global"


@pytest.mark.parametrize("family", FAMILIES)
def test_gauge_equivalent_checkpoints_canonicalize_to_the_same_bytes(family, tmp_path):
    """Every family: a checkpoint and two re-gauged copies; a family without norm gains (OLMo's
    non-parametric LayerNorm) has a continuous symmetry too, refused unless the chart is asked
    for the signed permutations alone."""
    build_tiny(family, seed=3).save_pretrained(tmp_path / "A", max_shard_size="60KB")
    gain_free = not any(get_family(family).op_for(k).kind == "G"
                        for k in build_tiny(family, seed=3).state_dict())
    if gain_free:
        with pytest.raises(GaugefixError, match="canonical chart is not defined"):
            canonical_chart(tmp_path / "A")
        assert not canonical_chart(tmp_path / "A", discrete_only=True).defined
    forms = []
    for k, seed in enumerate((None, 11, 12)):
        src = tmp_path / "A"
        if seed is not None:  # a re-gauged copy, in a random element of the family's group
            src = tmp_path / f"B{k}"
            gauge_checkpoint(tmp_path / "A", src, SignedPerm.random(64, seed=seed,
                             kind=_kind(family)), progress=False)
        canonicalize(src, tmp_path / f"C{k}", discrete_only=gain_free)
        forms.append(_weights(tmp_path / f"C{k}"))
    assert forms[0] and forms[0] == forms[1] == forms[2]
    assert forms[0] != _weights(tmp_path / "A")  # the chart moved something


def test_the_canonical_chart_of_a_loaded_model_equals_its_checkpoints(tmp_path):
    model = build_tiny("llama", seed=5)
    model.save_pretrained(tmp_path / "A")
    assert canonical_chart(model).gauge == canonical_chart(tmp_path / "A").gauge


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_untrained_gains_have_no_canonical_chart(family, tmp_path):
    build_tiny(family, seed=1, generic=False).save_pretrained(tmp_path / "A")
    with pytest.raises(GaugefixError, match=r"canonical chart is not defined"):
        canonical_chart(tmp_path / "A")


def test_what_the_weights_leave_open_is_reported_and_the_bytes_still_agree(tmp_path):
    """Coordinates 3 and 7 with equal gains in every norm (rotatable among themselves), and
    coordinates 10 and 20 identical in every tensor (interchangeable): both reported; the
    canonical forms of re-gauged copies are still byte-identical."""
    model = build_tiny("llama", seed=6)
    fam = get_family("llama")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            op = fam.op_for(name)
            if op.residual_axis is None:
                continue
            x = t.movedim(op.residual_axis, 0)
            if op.kind == "G":
                x[7] = x[3]
            x[20] = x[10]
    model.save_pretrained(tmp_path / "A")
    chart = canonical_chart(tmp_path / "A")
    assert [3, 7] in chart.rotatable and [10, 20] in chart.interchangeable
    assert any("O(2)" in line for line in chart.describe())
    g = SignedPerm.random(64, seed=2)
    gauge_model(model, g).save_pretrained(tmp_path / "B")
    canonicalize(tmp_path / "A", tmp_path / "CA")
    canonicalize(tmp_path / "B", tmp_path / "CB")
    assert _weights(tmp_path / "CA") == _weights(tmp_path / "CB")


def test_fingerprints_follow_the_function_not_the_chart(tmp_path, cli):
    """Equal for a re-gauged copy; changed by one bit of one weight."""
    import json

    build_tiny("qwen3", seed=2).save_pretrained(tmp_path / "A", max_shard_size="80KB")
    cli("apply", tmp_path / "A", tmp_path / "B", "--random", 4)
    fa = json.loads(cli("fingerprint", tmp_path / "A", "--json").stdout)
    fb = json.loads(cli("fingerprint", tmp_path / "B", "--json").stdout)
    assert fa["fingerprint"] == fb["fingerprint"] and fa["fingerprint"].startswith("gf1:")
    assert fa["sha256"] == fb["sha256"] and fa["canonical"] is True
    model = build_tiny("qwen3", seed=2)
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.view(-1)[17] = torch.nextafter(w.view(-1)[17], torch.tensor(1.0))
    model.save_pretrained(tmp_path / "C")
    fc = json.loads(cli("fingerprint", tmp_path / "C", "--json").stdout)
    assert fc["fingerprint"] != fa["fingerprint"]
    assert cli("fingerprint", tmp_path / "A").stdout.strip() == fa["fingerprint"]


def _noisy(model, rel, seed):
    """A relative: every weight moved by ``rel`` of its own scale (a stand-in for fine-tuning
    whose size is known by construction)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * rel * p.std().clamp_min(1e-3))
    return model


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_identify_tells_same_derived_and_unrelated(family, tmp_path, cli):
    import json

    kind = _kind(family)
    build_tiny(family, seed=3).save_pretrained(tmp_path / "A")
    g = SignedPerm.random(64, seed=8, kind=kind)
    gauge_checkpoint(tmp_path / "A", tmp_path / "same", g, progress=False)
    gauge_model(_noisy(build_tiny(family, seed=3), 0.02, seed=1), g).save_pretrained(
        tmp_path / "derived")
    build_tiny(family, seed=9).save_pretrained(tmp_path / "unrelated")
    got = {}
    for name in ("same", "derived", "unrelated"):
        got[name] = json.loads(cli("identify", tmp_path / "A", tmp_path / name, "--json").stdout)
        assert got[name]["verdict"] == name, (name, got[name]["reason"])
    assert SignedPerm.from_json(got["same"]["gauge"]) == g
    assert SignedPerm.from_json(got["derived"]["gauge"]) == g
    assert got["derived"]["median_relative_distance"] < 0.1
    assert got["unrelated"]["gauge"] is None
    assert got["unrelated"]["median_relative_distance"] > 1.0


def test_identify_different_shapes_is_a_verdict_not_an_error(tmp_path, cli):
    import json

    build_tiny("llama", seed=1).save_pretrained(tmp_path / "A")
    build_tiny("gpt2", seed=1).save_pretrained(tmp_path / "B")
    build_tiny("llama", seed=1, hidden_size=32).save_pretrained(tmp_path / "C")
    r = json.loads(cli("identify", tmp_path / "A", tmp_path / "B", "--json").stdout)
    assert r["verdict"] == "unrelated" and "different families" in r["reason"]
    assert r["gauge"] is None
    r = json.loads(cli("identify", tmp_path / "A", tmp_path / "C", "--json").stdout)
    assert r["verdict"] == "unrelated" and "different widths" in r["reason"]
