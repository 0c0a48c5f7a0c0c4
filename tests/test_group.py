"""Group laws of SignedPerm, the primitive, the index map, and input validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm


@st.composite
def gauges(draw, d: int | None = None):
    n = d if d is not None else draw(st.integers(1, 24))
    perm = draw(st.permutations(list(range(n))))
    sign = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    return SignedPerm(np.array(perm), np.array(sign))


@st.composite
def gauge_triples(draw):
    n = draw(st.integers(1, 16))
    return draw(gauges(n)), draw(gauges(n)), draw(gauges(n))


@given(gauge_triples())
def test_associativity(t):
    a, b, c = t
    assert a.then(b).then(c) == a.then(b.then(c))


@given(gauges())
def test_inverse_and_identity(g):
    e = SignedPerm.identity(g.d)
    assert g.then(g.inverse()) == e
    assert g.inverse().then(g) == e
    assert g.then(e) == g and e.then(g) == g
    assert g.inverse().inverse() == g


@given(gauges(), st.integers(0, 2), st.sampled_from([torch.float32, torch.float64,
                                                      torch.bfloat16, torch.float16]))
@settings(max_examples=60)
def test_apply_matches_dense_matrix(g, axis, dtype):
    shape = [3, 4, 5]
    shape[axis] = g.d
    x = torch.randn(shape, dtype=torch.float64)
    q = g.to_matrix()
    expected = torch.movedim(torch.tensordot(q, x, dims=([1], [axis])), 0, axis)
    assert torch.equal(g.apply(x, axis), expected)
    # bit-exact in low precision too: a gather and a sign flip, no arithmetic
    xl = x.to(dtype)
    assert torch.equal(g.apply(xl, axis), expected.to(dtype))
    assert torch.equal(g.inverse().apply(g.apply(xl, axis), axis), xl)
    # the raw-bits CPU backend and the index_select backend (used for autograd and
    # accelerators) agree
    assert torch.equal(g.apply(xl.clone().requires_grad_(True), axis).detach(),
                       g.apply(xl, axis))
    # unsigned: the gather only
    assert torch.equal(g.apply(x, axis, signed=False), g.unsigned().apply(x, axis))


@given(gauge_triples())
def test_composition_matches_sequential_application(t):
    a, b, _ = t
    x = torch.randn(a.d, 3, dtype=torch.float64)
    assert torch.equal(a.then(b).apply(x), b.apply(a.apply(x)))
    assert torch.equal((b @ a).to_matrix(), b.to_matrix() @ a.to_matrix())


@given(gauges())
def test_index_map_agrees_with_apply(g):
    x = torch.randn(g.d, dtype=torch.float64)
    xb = g.apply(x)
    i, s = g.index_map(range(g.d))
    # coordinate j of A is coordinate i[j] of B, carrying sign s[j]
    assert torch.equal(xb[torch.tensor(i)], torch.tensor(s, dtype=x.dtype) * x)


@given(gauges())
def test_matrix_round_trip_and_json(g):
    assert SignedPerm.from_matrix(g.to_matrix()) == g
    doc = json.loads(json.dumps(g.to_json({"method": "test"})))
    assert SignedPerm.from_json(doc) == g


def test_numpy_and_int_dtypes_are_supported():
    g = SignedPerm.random(5, seed=1)
    x = np.arange(10, dtype=np.int64).reshape(2, 5)
    y = g.apply(x, 1)
    assert isinstance(y, np.ndarray) and y.dtype == np.int64
    np.testing.assert_array_equal(g.inverse().apply(y, 1), x)


_TORCH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}


@given(gauges(), st.integers(0, 2), st.sampled_from(
    [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
     torch.int8, torch.uint8, torch.bool]), st.booleans())
@settings(max_examples=80)
def test_numpy_backends_equal_index_select_and_multiply(g, axis, dtype, signed):
    """The numpy primitive (values, and raw float bits as streaming uses it) equals the
    arithmetic reference bit for bit: index_select, then multiply by the signs; except that
    a NaN's sign bit flips too (a negation; x86's multiply returns the NaN as it is)."""
    shape = [3, 4, 5]
    shape[axis] = g.d
    x = (torch.randn(shape, dtype=torch.float64) * 50).to(dtype)
    if dtype.is_floating_point:  # specials: -0.0, NaN, infinities
        x.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("-inf")], dtype=dtype)[
            :x.numel()]
    if dtype == torch.bool and signed and (g.sign < 0).any():
        with pytest.raises(GaugefixError, match="boolean"):
            g.apply(x.numpy(), axis, signed)
        return
    ref = x.index_select(axis, torch.tensor(g.perm))
    view = [1] * 3
    view[axis] = g.d
    if signed and dtype != torch.bool:
        ref = ref * torch.tensor(g.sign).to(dtype).view(view)
    if dtype.is_floating_point:  # compare bits: NaN == NaN, -0.0 != 0.0
        idtype = _TORCH_INT[dtype]
        ref_bits = ref.view(idtype)
        if signed:  # NaN: gathered, then its sign bit flipped where the sign is -1
            nan = torch.isnan(ref)
            gathered = x.index_select(axis, torch.tensor(g.perm)).view(idtype)
            flip = torch.tensor(np.where(g.sign < 0, np.iinfo(np.dtype(str(idtype)[6:])).min,
                                         0)).to(idtype).view(view)
            ref_bits = torch.where(nan, gathered ^ flip, ref_bits)
        assert torch.equal(g.apply(x, axis, signed).view(idtype), ref_bits)
        raw = x.view(idtype).numpy()
        out = np.empty_like(raw)
        assert g.apply(raw, axis, signed, out=out, bits=True) is out
        np.testing.assert_array_equal(out, ref_bits.numpy())
        if dtype != torch.bfloat16:  # numpy has this float dtype
            got = g.apply(x.numpy(), axis, signed)
            np.testing.assert_array_equal(got.view(raw.dtype), ref_bits.numpy())
    else:
        got = g.apply(x.numpy(), axis, signed)
        assert got.dtype == x.numpy().dtype
        np.testing.assert_array_equal(got, ref.numpy())


@given(gauges(), st.integers(0, 2), st.sampled_from([torch.float32, torch.bfloat16, torch.int32,
                                                      torch.float64]),
       st.booleans(), st.data())
@settings(max_examples=60)
def test_parts_of_the_result_put_together_are_the_result(g, axis, dtype, signed, data):
    """``part=(lo, hi)`` gives the result's slices lo:hi along the axis (streaming writes a
    tensor whose residual axis is its first in such parts): for torch, for numpy values and
    for raw bits, the parts of any split concatenate to the whole result, bit for bit."""
    shape = [3, 2, 4]
    shape[axis] = g.d
    x = (torch.randn(shape, dtype=torch.float64) * 50).to(dtype)
    cuts = sorted(data.draw(st.lists(st.integers(0, g.d), max_size=4)))
    bounds = list(zip([0, *cuts], [*cuts, g.d], strict=True))
    whole = g.apply(x, axis, signed)
    parts = [g.apply(x, axis, signed, part=b) for b in bounds]
    assert torch.equal(torch.cat(parts, axis), whole)
    if dtype.is_floating_point:
        raw = x.view(_TORCH_INT[dtype]).numpy()
        outs = []
        for lo, hi in bounds:
            out_shape = list(raw.shape)
            out_shape[axis] = hi - lo
            out = np.empty(out_shape, raw.dtype)
            assert g.apply(raw, axis, signed, out=out, bits=True, part=(lo, hi)) is out
            outs.append(out)
        np.testing.assert_array_equal(np.concatenate(outs, axis),
                                      whole.view(_TORCH_INT[dtype]).numpy())
    if dtype != torch.bfloat16:
        np.testing.assert_array_equal(
            np.concatenate([g.apply(x.numpy(), axis, signed, part=b) for b in bounds], axis),
            whole.numpy())


def test_a_part_must_be_a_range_of_the_axis():
    g = SignedPerm.random(4, seed=0)
    for bad in [(-1, 2), (3, 2), (0, 5)]:
        with pytest.raises(GaugefixError, match=r"is not a range of 0\.\.4"):
            g.apply(np.zeros((2, 4), np.float32), 1, part=bad)
    with pytest.raises(GaugefixError, match=r"shape \[2, 2\]"):
        g.apply(np.zeros((2, 4), np.float32), 1, part=(1, 3), out=np.zeros((2, 4), np.float32))


def test_numpy_apply_refuses_what_it_cannot_do():
    g = SignedPerm.random(4, seed=0)
    with pytest.raises(GaugefixError, match="bits=True expects signed integers"):
        g.apply(np.zeros((2, 4), np.float32), 1, bits=True)
    with pytest.raises(GaugefixError, match="contiguous"):
        g.apply(np.zeros((2, 4), np.float32), 1, out=np.zeros((4, 2), np.float32).T)
    with pytest.raises(GaugefixError, match="width mismatch"):
        g.apply(np.zeros((2, 5), np.float32), 1)


def test_negative_zero_and_nan_round_trip_bitwise():
    g = SignedPerm(np.array([1, 0, 2]), np.array([-1, -1, 1]))
    x = torch.tensor([-0.0, float("nan"), float("inf")])
    back = g.inverse().apply(g.apply(x))
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


def test_random_kinds():
    g = SignedPerm.random(100, seed=0, kind="global")
    assert g.global_sign in (-1, 1)
    assert SignedPerm.random(100, seed=0, kind="perm").positive_fraction == 1.0
    for p in (0.0, 0.25, 0.5, 1.0):
        assert SignedPerm.random(100, seed=3, positive_fraction=p).positive_fraction == p
    assert SignedPerm.random(50, seed=7) == SignedPerm.random(50, seed=7)
    assert SignedPerm.random(50, seed=7) != SignedPerm.random(50, seed=8)


def test_compare_reports_perm_sign_and_full_accuracy():
    ref = SignedPerm(np.arange(4), np.array([1, -1, 1, -1]))
    est = SignedPerm(np.array([0, 1, 3, 2]), np.array([1, 1, 1, -1]))
    c = est.compare(ref)
    assert c["perm_accuracy"] == 0.5
    assert c["sign_accuracy"] == 0.5  # of the two matched coordinates, one sign right
    assert c["full_accuracy"] == 0.25


@pytest.mark.parametrize(
    "perm, sign, message",
    [
        ([0, 0, 1], [1, 1, 1], "missing"),
        ([0, 1, 3], [1, 1, 1], "permutation of 0..2"),
        ([0, 1, 2], [1, 0, 1], "sign must be"),
        ([0, 1, 2], [1, 2, 1], "sign must be"),
        ([0, 1], [1, 1, 1], "lengths differ"),
        ([0.5, 1, 2], [1, 1, 1], "integers"),
        ([], [], "d = 0"),
    ],
)
def test_validation(perm, sign, message):
    with pytest.raises(GaugefixError, match=message):
        SignedPerm(np.array(perm), np.array(sign))


def test_apply_rejects_wrong_width_and_axis():
    g = SignedPerm.random(4, seed=0)
    with pytest.raises(GaugefixError, match="width mismatch"):
        g.apply(torch.zeros(3, 5), 1)
    with pytest.raises(GaugefixError, match="out of range"):
        g.apply(torch.zeros(4), 1)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other"), "not a gauge file"),
        (lambda d: d.update(convention="x_A = Q x_B"), "unknown convention"),
        (lambda d: d.pop("perm"), "missing field 'perm'"),
        (lambda d: d.update(d=5), "d=5 but perm has 4"),
        (lambda d: d.update(perm=[0, 1, 2, 2]), "missing"),
        (lambda d: d.update(sign=[1, -1, 1, 0]), "sign entries must be"),
        (lambda d: d.update(sign=[True, 1, 1, 1]), "found True"),
        (lambda d: d.update(perm=[0, 1, 2, 10**30]), r"perm entries must be integers in 0\.\.3"),
        (lambda d: d.update(perm=[0, 1, 2, 3.5]), "found 3.5"),
        (lambda d: d.update(confidence=[1.0]), "confidence"),
    ],
)
def test_malformed_gauge_documents(mutate, message):
    doc = SignedPerm.random(4, seed=0).to_json()
    mutate(doc)
    with pytest.raises(GaugefixError, match=message):
        SignedPerm.from_json(doc)


def test_save_and_load_refuses_overwrite(tmp_path):
    g = SignedPerm.random(8, seed=2)
    path = g.save(tmp_path / "g.json", {"method": "random"})
    assert SignedPerm.load(path) == g
    with pytest.raises(GaugefixError, match="already exists"):
        g.save(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GaugefixError, match="not valid JSON"):
        SignedPerm.load(tmp_path / "bad.json")
