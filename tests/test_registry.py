"""Transport kinds and merge methods come from one registry that carries their metadata;
the CLI is built from it."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil

import pytest
import torch

import gaugefix.transport
from gaugefix.registry import MERGE_METHODS, TRANSPORT_KINDS

from .test_interp_formats import G2, D, G, _ck_forward, _ck_state, _cli_error, _per_slot, _t


def test_every_kind_resolves_and_every_adapter_is_registered():
    targets = {k.target for k in TRANSPORT_KINDS.values()}
    for kind in TRANSPORT_KINDS.values():
        fn = kind.adapter()
        params = inspect.signature(fn).parameters
        assert {"record", "overwrite"} <= params.keys(), kind.name
        assert set(kind.options) <= params.keys(), kind.name
    # no adapter module defines a format adapter the registry does not list
    for mod in pkgutil.iter_modules(gaugefix.transport.__path__):
        module = importlib.import_module(f"gaugefix.transport.{mod.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if (fn.__module__ == module.__name__ and name.startswith("transport_")
                    and "record" in inspect.signature(fn).parameters):
                assert f"{module.__name__}:{name}" in targets, name


def test_the_cli_lists_the_registry(cli):
    text = " ".join(cli("transport", "--help").stdout.split())
    for kind in TRANSPORT_KINDS:
        assert f"{kind}:" in text
    text = " ".join(cli("merge", "--help").stdout.split())
    for method in MERGE_METHODS:
        assert method in text
    assert "linear: (1−w)·A + w·B" in text


def test_an_option_goes_with_the_kinds_that_declare_it(cli, tmp_path):
    G.save(tmp_path / "g.json")
    (tmp_path / "sae").mkdir()
    _cli_error(cli, tmp_path, ["transport", "sae", tmp_path / "sae", "--gauge",
                               tmp_path / "g.json", "-o", tmp_path / "out", "--model",
                               tmp_path / "sae", "--family", "llama"],
               "--model goes with the lora, optim and imatrix kinds, not sae",
               "--family goes with the lora kind, not sae")
    _cli_error(cli, tmp_path, ["transport", "sae", tmp_path / "sae", "--gauge",
                               tmp_path / "g.json", "--gauge", tmp_path / "g.json", "-o",
                               tmp_path / "out"], "sae takes one gauge", "crosscoder")


def test_per_slot_gauges_from_the_cli(cli, tmp_path):
    """A crosscoder across a base and a chat model: slot 0 stays (``-``), slot 1 moves by its
    own gauge, slot 2 by another."""
    src = tmp_path / "cc"
    src.mkdir()
    t = _ck_state(3)
    torch.save(t, src / "cc_weights.pt")
    (src / "cfg.json").write_text(json.dumps({"d_in": D}))
    G.save(tmp_path / "g1.json")
    G2.save(tmp_path / "g2.json")
    cli("transport", "crosscoder", src, "--gauge", "-", "--gauge", tmp_path / "g1.json",
        "--gauge", tmp_path / "g2.json", "-o", tmp_path / "B")
    m = torch.load(tmp_path / "B" / "cc_weights.pt", weights_only=True)
    x = _t(8, 3, D, seed=7)
    gauges = [None, G, G2]
    assert torch.allclose(_ck_forward(m, _per_slot(x, gauges)),
                          _per_slot(_ck_forward(t, x), gauges), atol=1e-5)
    cli("transport", "crosscoder", tmp_path / "B", "--gauge", "-", "--gauge",
        tmp_path / "g1.json", "--gauge", tmp_path / "g2.json", "--inverse", "-o",
        tmp_path / "A")
    back = torch.load(tmp_path / "A" / "cc_weights.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in t.items())
    _cli_error(cli, tmp_path, ["transport", "crosscoder", src, "--gauge", "-", "--gauge",
                               tmp_path / "g1.json", "-o", tmp_path / "C"],
               "3 slots, got 2 gauges")


@pytest.mark.parametrize("method, weight, ok", [("linear", 1.5, False), ("slerp", -0.1, False),
                                                ("task-arithmetic", 2.0, True)])
def test_merge_weight_ranges_come_from_the_registry(method, weight, ok):
    from gaugefix.errors import GaugefixError
    from gaugefix.transport.merge import check_weight

    if ok:
        check_weight(method, weight)
    else:
        with pytest.raises(GaugefixError, match=r"must lie in 0\.\.1.*task-arithmetic"):
            check_weight(method, weight)
