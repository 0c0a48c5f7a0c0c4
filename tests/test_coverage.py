"""The coverage sweep over transformers' own causal-LM mapping (gaugefix.coverage)."""

from __future__ import annotations

import pytest

from gaugefix.arch import families
from gaugefix.coverage import causal_lm_types, sweep

STATUSES = {"supported", "failed", "candidate", "refused", "not mapped", "not a decoder",
            "not buildable offline"}


@pytest.fixture(scope="module")
def rows():
    return sweep()


def test_every_registered_model_type_is_classified_with_its_reason(rows):
    assert [r.model_type for r in rows] == causal_lm_types()
    assert {r.status for r in rows} <= STATUSES
    assert all(r.detail for r in rows if r.status != "supported")


def test_every_mapped_model_type_transformers_registers_is_verified(rows):
    """Each model type of the family map, built from its own config class: a random gauge of
    its family's group leaves logits and every hidden state as they were (moved)."""
    by = {r.model_type: r for r in rows}
    mapped = {t for f in families().values() for t in f.model_types}
    checked = sorted(mapped & set(by))
    assert len(checked) >= 100
    bad = [by[t] for t in checked if by[t].status != "supported"]
    assert not bad, bad


def test_no_model_type_fits_the_rules_without_being_in_the_map(rows):
    """A model type whose tensors one family's rules plan, with the function preserved, is
    added to the map (as data); the sweep finds them when transformers adds some."""
    assert not [r for r in rows if r.status == "candidate"]
    assert not [r for r in rows if r.status == "failed"]


def test_refusals_are_checked_not_only_stated(rows):
    """A refused model type's tensors are planned by the rules its entry names, and a random
    gauge through them changes the function: the sweep says so, or the row is 'failed'."""
    from gaugefix.arch import table

    by = {r.model_type: r for r in rows}
    refused = sorted(set(table().refused) & set(by))
    assert refused
    for t in refused:
        assert by[t].status == "refused", by[t]
        assert "checked: function changed" in by[t].detail


def test_not_mapped_rows_name_the_closest_family_and_what_it_leaves(rows):
    rest = [r for r in rows if r.status == "not mapped"]
    assert all(("closest:" in r.detail and "unplanned" in r.detail) or "multimodal" in r.detail
               or "plan every tensor, but" in r.detail for r in rest), rest


def test_the_check_fails_on_a_wrong_rule():
    """The sweep's check can fail: a gain a rule leaves untouched, a reader moved on the wrong
    axis, a concatenated axis moved as one stream. Every constant tensor is made generic
    first, whatever the rules under test call it."""
    import dataclasses

    from gaugefix.arch import Op, get_family
    from gaugefix.coverage import check_family
    from gaugefix.tiny import build_tiny

    def wrong(family: str, suffix: str, op: Op) -> str | None:
        fam = get_family(family)
        rules = tuple(dataclasses.replace(r, ops=(op,)) if suffix in r.pattern else r
                      for r in fam.rules)
        assert rules != fam.rules
        return check_family(build_tiny(family, generic=False),
                            dataclasses.replace(fam, rules=rules), 64)

    assert check_family(build_tiny("llama", generic=False), get_family("llama"), 64) is None
    assert wrong("llama", "input_layernorm", Op("-")).startswith("function changed")
    assert wrong("llama", "mlp\\.(gate|up)_proj\\.weight", Op("H", 0)) is not None
    assert wrong("zamba2", "shared_transformer\\.input_layernorm", Op("-")).startswith(
        "function changed")
    assert "width mismatch" in wrong("zamba2", "self_attn\\.[qkv]_proj", Op("H", 1))
