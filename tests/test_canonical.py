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
