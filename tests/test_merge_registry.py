"""Merge methods carry their implementations (#18.4): each registry entry holds its
elementwise function, weight range, base and options, and merge dispatches through it;
and merge_checkpoints refuses what it cannot honour (#19): an export without a gauge, a base
a method does not take, an overflowing result."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from gaugefix.checkpoint import Checkpoint
from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.model import open_model
from gaugefix.registry import MERGE_METHODS
from gaugefix.tiny import build_tiny
from gaugefix.transport import merge_checkpoints


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for name, seed in (("A", 1), ("B", 2), ("base", 3)):
        build_tiny("llama", seed=seed).save_pretrained(root / name, max_shard_size="60KB")
    build_tiny("llama", seed=1).to(torch.float16).save_pretrained(root / "A16")
    return root


def _direct(method, a, b, w, base):
    """Each method's formula, written out independently of the registry."""
    a, b = a.double(), b.double()
    if method == "linear":
        return (1 - w) * a + w * b
    if method == "task-arithmetic":
        base = base.double()
        return base + (a - base) + w * (b - base)
    cos = float(a.reshape(-1) @ b.reshape(-1)) / float(a.norm() * b.norm())
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - w) * theta) * a + math.sin(w * theta) * b) / math.sin(theta)


def _kw(method, models):
    return {"base": models / "base"} if MERGE_METHODS[method].takes_base else {}


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_each_method_runs_its_own_implementation(method, models, tmp_path, monkeypatch):
    """merge calls the registered function of the method asked for (and no other), and its
    result is the method's formula."""
    calls = {m: 0 for m in MERGE_METHODS}
    for name, entry in list(MERGE_METHODS.items()):
        def spy(*args, _name=name, _fn=entry.combine, **kw):
            calls[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setitem(MERGE_METHODS, name, dataclasses.replace(entry, combine=spy))
    merge_checkpoints(models / "A", models / "B", None, tmp_path / "M", method=method,
                      weight=0.3, **_kw(method, models))
    assert calls[method] > 0
    assert all(n == 0 for m, n in calls.items() if m != method), calls
    get = {n: open_model(p).tensor for n, p in (("A", models / "A"), ("B", models / "B"),
                                                       ("base", models / "base"),
                                                       ("M", tmp_path / "M"))}
    for _, k, _ in Checkpoint.open(models / "A").entries():
        want = _direct(method, get["A"](k), get["B"](k), 0.3, get["base"](k)).to(torch.float32)
        assert torch.allclose(get["M"](k), want, rtol=1e-5, atol=1e-7), k


def test_an_unknown_method_is_one_error_naming_the_choices(models, tmp_path):
    with pytest.raises(GaugefixError) as err:
        merge_checkpoints(models / "A", models / "B", None, tmp_path / "M", method="ties")
    assert "'ties'" in str(err.value)
    assert all(m in str(err.value) for m in MERGE_METHODS)
    assert not (tmp_path / "M").exists()


def test_an_export_without_a_gauge_is_refused(models, tmp_path):
    with pytest.raises(GaugefixError, match=r"nothing to export.*needs a gauge"):
        merge_checkpoints(models / "A", models / "B", None, tmp_path / "M",
                          export_aligned=tmp_path / "X")
    assert not (tmp_path / "M").exists() and not (tmp_path / "X").exists()


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_a_base_goes_with_the_methods_that_take_one(method, models, tmp_path):
    if MERGE_METHODS[method].takes_base:
        with pytest.raises(GaugefixError, match=f"{method} needs --base"):
            merge_checkpoints(models / "A", models / "B", None, tmp_path / "M", method=method)
    else:
        with pytest.raises(GaugefixError, match=rf"{method} takes no base.*task-arithmetic"):
            merge_checkpoints(models / "A", models / "B", None, tmp_path / "M", method=method,
                              base=models / "base")
    assert not (tmp_path / "M").exists()


@pytest.mark.parametrize("a, weight", [("A", 1e308), ("A16", 1e5)])
def test_an_overflowing_merge_is_refused_naming_the_tensor(a, weight, models, tmp_path):
    """A weight that takes the result beyond float64, or beyond A's dtype (float16 here), is
    refused naming the tensor and the weight; neither the merge nor the export appears."""
    g = SignedPerm.random(64, seed=0)
    with pytest.raises(GaugefixError) as err:
        merge_checkpoints(models / a, models / "B", g, tmp_path / "M",
                          method="task-arithmetic", weight=weight, base=models / "base",
                          export_aligned=tmp_path / "X")
    msg = str(err.value)
    assert f"weight {weight:g}" in msg and "non-finite" in msg and "nothing written" in msg
    assert any(k in msg for _, k, _ in Checkpoint.open(models / "A").entries())
    assert not (tmp_path / "M").exists() and not (tmp_path / "X").exists()


def test_non_finite_values_of_the_inputs_are_carried_not_refused(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(models / "A", tmp_path / "A")
    shard = sorted((tmp_path / "A").glob("*.safetensors"))[0]
    sd = load_file(shard)
    k = next(iter(sd))
    sd[k].view(-1)[0] = float("inf")
    save_file(sd, str(shard), metadata={"format": "pt"})
    merge_checkpoints(tmp_path / "A", models / "B", None, tmp_path / "M", weight=0.5)
    assert torch.isinf(open_model(tmp_path / "M").tensor(k).view(-1)[0])


def test_options_go_with_the_methods_that_declare_them(models, tmp_path):
    merge_checkpoints(models / "A", models / "B", None, tmp_path / "S", method="slerp",
                      options={"eps": 1e-6})
    with pytest.raises(GaugefixError, match="--eps goes with the slerp method, not linear"):
        merge_checkpoints(models / "A", models / "B", None, tmp_path / "L",
                          options={"eps": 1e-6})
    assert not (tmp_path / "L").exists()


def test_the_registry_imports_no_torch():
    code = ("import sys, gaugefix.registry as r; assert r.MERGE_METHODS; "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stdout + res.stderr
