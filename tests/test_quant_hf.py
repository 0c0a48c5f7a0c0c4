"""Hugging Face quantised Linears moved under a gauge (gaugefix.quant.hf).

Fixtures are built as the formats' own code builds them: AutoGPTQ's ``pack`` loops and
AutoAWQ's ``from_linear`` loops are transcribed here (neither library installs on this
CPU-only setup), compressed-tensors' own ``calculate_qparams``/``quantize``/
``pack_to_int32`` are called. Every exact move is checked bit for bit against the
dequantised weight moved by ``SignedPerm.apply``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.quant import hf
from gaugefix.quant.hf import QuantScheme, dequantise, move

try:  # the test extra installs it; without it only its own tests skip
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams
except ImportError:  # pragma: no cover
    pack_to_int32 = None
needs_ct = pytest.mark.skipif(pack_to_int32 is None, reason="compressed-tensors not installed")

OUT, IN = 128, 256


def weight(seed: int, out: int = OUT, inp: int = IN) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def group_gauge(d: int, group: int, seed: int, signed: bool = False,
                whole_group_signs: bool = False) -> SignedPerm:
    """Groups moved whole (their order and the order inside each shuffled)."""
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(d // group)
    perm = np.concatenate([b * group + rng.permutation(group) for b in blocks])
    if whole_group_signs:
        sign = np.repeat(rng.choice([-1, 1], size=d // group), group)
    elif signed:
        sign = rng.choice([-1, 1], size=d)
    else:
        sign = np.ones(d, dtype=np.int64)
    return SignedPerm(perm, sign)


def signs_only(d: int, seed: int) -> SignedPerm:
    return SignedPerm(np.arange(d), np.random.default_rng(seed).choice([-1, 1], size=d))


def check_exact(scheme, tensors, gauge, axis):
    m = move(scheme, tensors, gauge, axis)
    assert m.how == "exact", m
    assert m.error is None and m.requantised_cells == 0
    assert torch.equal(dequantise(scheme, m.tensors),
                       gauge.apply(dequantise(scheme, tensors), axis, True))
    for k, v in tensors.items():
        assert m.tensors[k].dtype == v.dtype and tuple(m.tensors[k].shape) == tuple(v.shape)
    return m


def check_requantised(scheme, tensors, gauge, axis, quant_error):
    """The move is requantised, reports its error, and that error is the one measured.

    ``round_trip_error`` requantises the unmoved weight: ~0 for quantisers that reproduce
    their own grid, so the bound falls back to the original quantisation's own error."""
    m = move(scheme, tensors, gauge, axis)
    assert m.how == "requantised" and m.requantised_cells > 0
    target = gauge.apply(dequantise(scheme, tensors), axis, True)
    assert m.error == pytest.approx(rel(dequantise(scheme, m.tensors), target), rel=1e-6)
    assert 0 < m.error <= 1.5 * max(m.round_trip_error, quant_error)
    return m


# ---------------------------------------------------------------------------- GPTQ
def gptq_build(w: torch.Tensor, group: int, act_order: bool, bits: int = 4, seed: int = 0):
    """AutoGPTQ: Quantizer.find_params (asymmetric, per group) and QuantLinear.pack
    (qlinear_cuda_old.py), loops as written there; zeros stored minus one."""
    out, inp = w.shape
    maxq = 2**bits - 1
    g_idx = torch.arange(inp) // group
    if act_order:  # GPTQ's desc_act: g_idx[perm[j]] = j // group
        order = torch.from_numpy(np.random.default_rng(seed).permutation(inp))
        g_idx = torch.empty(inp, dtype=torch.int64)
        g_idx[order] = torch.arange(inp) // group
    groups = inp // group
    scales = torch.zeros(out, groups)
    zeros = torch.zeros(out, groups)
    for g in range(groups):
        x = w[:, g_idx == g]
        xmin = torch.clamp(x.min(1).values, max=0)
        xmax = torch.clamp(x.max(1).values, min=0)
        scale = (xmax - xmin) / maxq
        scales[:, g], zeros[:, g] = scale, torch.round(-xmin / scale)
    scales_h = scales.t().contiguous().half()  # [groups, out]
    zeros_t = zeros.t().contiguous()
    intweight = torch.stack([
        torch.clamp(torch.round(w[:, i] / scales_h[g_idx[i]].float()) + zeros_t[g_idx[i]],
                    0, maxq).to(torch.int)
        for i in range(inp)], dim=1)  # [out, in]
    deq = (scales_h.float()[g_idx].t() * (intweight - zeros_t[g_idx].t()))
    iw = intweight.t().contiguous().numpy().astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= iw[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    z = (zeros_t - 1).numpy().astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // bits)):
            qzeros[:, col] |= z[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    tensors = {"qweight": torch.from_numpy(qweight.astype(np.int32)),
               "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
               "scales": scales_h, "g_idx": g_idx.to(torch.int32)}
    scheme = hf.detect_scheme({"quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
        "sym": False}})
    return scheme, tensors, deq, rel(deq, w)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_layout_is_autogptqs(act_order, bits):
    scheme, t, deq, _ = gptq_build(weight(1), 32, act_order, bits)
    assert scheme.zero_offset == 1 and scheme.act_order == act_order
    assert torch.equal(dequantise(scheme, t), deq)
    assert hf.logical_shape(scheme, {k: tuple(v.shape) for k, v in t.items()}) == (OUT, IN)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_writer_moves_are_exact(act_order):
    scheme, t, _, _ = gptq_build(weight(2), 64, act_order)
    m = check_exact(scheme, t, SignedPerm.random(OUT, seed=3), 0)
    assert m.config_change == {}


def test_gptq_act_order_reader_permutation_moves_g_idx():
    scheme, t, _, _ = gptq_build(weight(4), 32, True)
    gauge = SignedPerm.random(IN, seed=5, kind="perm")
    m = check_exact(scheme, t, gauge, 1)
    assert torch.equal(m.tensors["g_idx"], gauge.apply(t["g_idx"], 0, False))
    assert m.config_change == {}


def test_gptq_reader_permutation_without_act_order():
    scheme, t, _, _ = gptq_build(weight(6), 32, False)
    # groups moved whole: the scale and zero rows move, g_idx stays the plain grid
    m = check_exact(scheme, t, group_gauge(IN, 32, seed=7), 1)
    assert torch.equal(m.tensors["g_idx"], t["g_idx"]) and m.config_change == {}
    # any other permutation: exact through the permuted g_idx, which needs desc_act
    gauge = SignedPerm.random(IN, seed=8, kind="perm")
    m = check_exact(scheme, t, gauge, 1)
    assert torch.equal(m.tensors["g_idx"], gauge.apply(t["g_idx"], 0, False))
    assert m.config_change == {"desc_act": True}


def test_gptq_without_g_idx_tensor_keeps_the_grid():
    """Some GPTQ checkpoints omit g_idx: no column->group map to write, so a permutation
    that splits groups requantises the cells it mixes instead."""
    scheme, t, _, qerr = gptq_build(weight(57), 32, False)
    del t["g_idx"]
    check_exact(scheme, t, group_gauge(IN, 32, seed=58), 1)
    m = check_requantised(scheme, t, SignedPerm.random(IN, seed=59, kind="perm"), 1, qerr)
    assert set(m.tensors) == set(t) and m.config_change == {}


def test_gptq_reader_signs():
    scheme, t, _, qerr = gptq_build(weight(9), 32, True)
    # a sign shared by a whole group negates that group's scales: exact
    by_group = torch.from_numpy(np.random.default_rng(10).choice([-1, 1], size=IN // 32))
    gauge = SignedPerm(np.arange(IN), by_group[t["g_idx"].long()].numpy())
    m = check_exact(scheme, t, gauge, 1)
    assert (m.tensors["scales"] < 0).any()
    # signs cutting through groups: zero points are asymmetric, those cells requantised
    check_requantised(scheme, t, SignedPerm.random(IN, seed=11), 1, qerr)


# ---------------------------------------------------------------------------- AWQ
def awq_build(w: torch.Tensor, group: int):
    """AutoAWQ: pseudo_quantize_tensor (zero_point) and WQLinear_GEMM.from_linear's packing
    (columns in AWQ_ORDER within each int32)."""
    out, inp = w.shape
    wg = w.reshape(-1, group)
    max_val, min_val = wg.amax(1, keepdim=True), wg.amin(1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(min_val / scales.float())).clamp_(0, 15)
    scales, zeros = scales.view(out, -1), zeros.view(out, -1)
    intweight = torch.stack([
        torch.clamp(torch.round(w[:, i] / scales[:, i // group].float())
                    + zeros[:, i // group], 0, 15)
        for i in range(inp)], dim=1).to(torch.int32)
    deq = scales.float().repeat_interleave(group, 1) * (
        intweight - zeros.repeat_interleave(group, 1))
    iw = intweight.t().contiguous()  # [in, out]
    qweight = torch.zeros(inp, out // 8, dtype=torch.int32)
    for col in range(out // 8):
        for i in range(8):
            qweight[:, col] |= iw[:, col * 8 + hf.AWQ_ORDER[i]] << (i * 4)
    zt = zeros.t().contiguous().to(torch.int32)  # [in/g, out]
    qzeros = torch.zeros(zt.shape[0], out // 8, dtype=torch.int32)
    for col in range(out // 8):
        for i in range(8):
            qzeros[:, col] |= zt[:, col * 8 + hf.AWQ_ORDER[i]] << (i * 4)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous()}
    scheme = hf.detect_scheme({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
        "zero_point": True}})
    return scheme, tensors, deq, rel(deq, w)


def test_awq_layout_and_moves():
    scheme, t, deq, qerr = awq_build(weight(12), 128)
    assert torch.equal(dequantise(scheme, t), deq)
    assert hf.logical_shape(scheme, {k: tuple(v.shape) for k, v in t.items()}) == (OUT, IN)
    check_exact(scheme, t, SignedPerm.random(OUT, seed=13), 0)
    check_exact(scheme, t, group_gauge(IN, 128, seed=14), 1)
    check_exact(scheme, t, group_gauge(IN, 128, seed=15, whole_group_signs=True), 1)
    m = check_requantised(scheme, t, SignedPerm.random(IN, seed=16, kind="perm"), 1, qerr)
    # min-max RTN nearly reproduces its own grid (fp16 scales shift a code in a few cells)
    assert m.round_trip_error < qerr / 5
    check_requantised(scheme, t, group_gauge(IN, 128, seed=17, signed=True), 1, qerr)


def test_awq_numpy_in_numpy_out():
    scheme, t, _, _ = awq_build(weight(18), 64)
    tn = {f"model.layers.0.mlp.down_proj.{k}": v.numpy() for k, v in t.items()}
    m = move(scheme, tn, SignedPerm.random(OUT, seed=19), 0)
    assert set(m.tensors) == set(tn)
    assert all(isinstance(v, np.ndarray) for v in m.tensors.values())


# ---------------------------------------------------------------------------- compressed-tensors
def ct_build(w: torch.Tensor, group: int | None, symmetric: bool = True,
             g_idx: torch.Tensor | None = None, bits: int = 4):
    """compressed-tensors' own qparams, quantize and pack_to_int32 (pack-quantized)."""
    out, inp = w.shape
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    gidx = torch.zeros(inp, dtype=torch.int64) if group is None else (
        torch.arange(inp) // group if g_idx is None else g_idx)
    groups = int(gidx.max()) + 1
    q = torch.empty(out, inp, dtype=torch.int8)
    scale = torch.empty(out, groups)
    zp = torch.empty(out, groups, dtype=torch.int8)
    for g in range(groups):
        x = w[:, gidx == g]
        s, z = calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)
        q[:, gidx == g] = quantize(x, s, None if symmetric else z, args, dtype=torch.int8)
        scale[:, g], zp[:, g] = s[:, 0], z[:, 0]
    deq = scale[:, gidx] * (q.float() - (0 if symmetric else zp[:, gidx].float()))
    t = {"weight_packed": pack_to_int32(q, bits), "weight_scale": scale,
         "weight_shape": torch.tensor([out, inp])}
    if not symmetric:
        t["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    if g_idx is not None:
        t["weight_g_idx"] = g_idx.to(torch.int32)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if group is None else "group", "group_size": group,
               "actorder": "group" if g_idx is not None else None}
    scheme = hf.detect_scheme({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}}, t)
    return scheme, t, deq, rel(deq, w), q


@needs_ct
def test_ct_packing_is_the_librarys():
    codes = torch.randint(-8, 8, (OUT, IN), generator=torch.Generator().manual_seed(20),
                          dtype=torch.int8)
    assert torch.equal(hf._pack(codes.long() + 8, 4, 1), pack_to_int32(codes, 4))
    assert torch.equal(hf._pack(codes.long() + 8, 4, 0), pack_to_int32(codes, 4, 0))
    packed = pack_to_int32(codes, 4)
    assert torch.equal(hf._unpack(packed, 4, 1, IN) - 8,
                       unpack_from_int32(packed, 4, torch.Size((OUT, IN))).long())


@needs_ct
@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_channel(symmetric):
    scheme, t, deq, _qerr, q = ct_build(weight(21), None, symmetric)
    assert scheme.capability_row == "ct-int-channel"
    assert torch.equal(dequantise(scheme, t), deq)
    check_exact(scheme, t, SignedPerm.random(OUT, seed=22), 0)
    check_exact(scheme, t, SignedPerm.random(IN, seed=23, kind="perm"), 1)
    if symmetric:
        # a flipped column without the code -8 in any row negates exactly
        clean = np.flatnonzero(~(q == -8).any(0).numpy())
        assert 0 < clean.size < IN
        perm = np.random.default_rng(24).permutation(IN)
        sign = np.where(np.isin(perm, clean[::2]), -1, 1)  # sign[i] goes with source perm[i]
        check_exact(scheme, t, SignedPerm(perm, sign), 1)


@needs_ct
def test_ct_channel_sign_of_code_minus_8_is_requantised():
    """A row whose flipped column holds -8 is requantised; by the symmetry of the
    symmetric quantiser (round half to even, clamp at [-8, 7] around a scale of
    max|w| / 7.5) it costs exactly what the round trip costs in that row, hence no
    more than the whole round trip."""
    scheme, t, _, _, q = ct_build(weight(25), None, True)
    gauge = SignedPerm.random(IN, seed=26)
    m = move(scheme, t, gauge, 1)
    assert m.how == "requantised" and 0 < m.requantised_cells <= OUT
    assert 0 < m.error <= m.round_trip_error * (1 + 1e-6)
    target = gauge.apply(dequantise(scheme, t), 1, True)
    moved = dequantise(scheme, m.tensors)
    rows_with_minus8 = (gauge.apply(q, 1, False)[:, gauge.sign < 0] == -8).any(1)
    assert torch.equal(moved[~rows_with_minus8], target[~rows_with_minus8])


@needs_ct
@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_group_without_g_idx(symmetric):
    scheme, t, deq, qerr, _ = ct_build(weight(27), 64, symmetric)
    assert scheme.capability_row == "ct-int-group"
    assert torch.equal(dequantise(scheme, t), deq)
    check_exact(scheme, t, SignedPerm.random(OUT, seed=28), 0)
    check_exact(scheme, t, group_gauge(IN, 64, seed=29, whole_group_signs=True), 1)
    check_requantised(scheme, t, SignedPerm.random(IN, seed=30, kind="perm"), 1, qerr)


@needs_ct
def test_ct_group_with_g_idx_any_permutation_is_exact():
    rng = np.random.default_rng(31)
    g_idx = torch.from_numpy(rng.permutation(np.arange(IN) // 32))
    scheme, t, deq, _, _ = ct_build(weight(32), 32, True, g_idx=g_idx)
    assert scheme.capability_row == "ct-int-group-act-order"
    assert torch.equal(dequantise(scheme, t), deq)
    gauge = SignedPerm.random(IN, seed=33, kind="perm")
    m = check_exact(scheme, t, gauge, 1)
    assert torch.equal(m.tensors["weight_g_idx"], gauge.apply(t["weight_g_idx"], 0, False))
    check_exact(scheme, t, SignedPerm.random(OUT, seed=34), 0)


# ---------------------------------------------------------------------------- FP8
def fp8_channel_build(w: torch.Tensor):
    scale = w.abs().amax(1, keepdim=True) / hf.FP8_MAX
    t = {"weight": (w / scale).to(torch.float8_e4m3fn), "weight_scale": scale}
    scheme = hf.detect_scheme({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float",
                                                  "strategy": "channel"}}}}})
    return scheme, t


def fp8_block_build(w: torch.Tensor, block: int = 128):
    """DeepSeek-V3's rule per 128x128 tile: scale = amax / 448, cast to e4m3."""
    out, inp = w.shape
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-out // block), -(-inp // block))
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            tile = w[r * block:(r + 1) * block, c * block:(c + 1) * block]
            s[r, c] = tile.abs().amax() / hf.FP8_MAX
            q[r * block:(r + 1) * block, c * block:(c + 1) * block] = (tile / s[r, c]).to(
                torch.float8_e4m3fn)
    t = {"weight": q, "weight_scale_inv": s}
    scheme = hf.detect_scheme({"quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic",
        "weight_block_size": [block, block]}})
    deq = q.float() * s.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return scheme, t, deq, rel(deq, w)


def test_fp8_channel_every_move_is_exact():
    scheme, t = fp8_channel_build(weight(35))
    for axis, d in ((0, OUT), (1, IN)):
        m = check_exact(scheme, t, SignedPerm.random(d, seed=36 + axis), axis)
        assert (m.tensors["weight_scale"] > 0).all()


def test_fp8_block():
    scheme, t, deq, qerr = fp8_block_build(weight(38, 256, 384))
    assert torch.equal(dequantise(scheme, t), deq)
    for axis, d in ((0, 256), (1, 384)):
        check_exact(scheme, t, group_gauge(d, 128, seed=39 + axis, signed=True), axis)
        m = check_requantised(scheme, t, SignedPerm.random(d, seed=41 + axis), axis, qerr)
        assert m.round_trip_error < 1e-6  # the block rule reproduces its own tiles


def test_fp8_block_partial_tile():
    """An axis of 320 has tiles 128, 128, 64: the short tile can only stay put."""
    scheme, t, _, qerr = fp8_block_build(weight(43, 128, 320))
    perm = np.concatenate([128 + np.arange(128), np.arange(128), 256 + np.arange(64)[::-1]])
    check_exact(scheme, t, SignedPerm(perm, np.ones(320, dtype=np.int64)), 1)
    perm = np.concatenate([np.arange(64) + 256, np.arange(256)])
    check_requantised(scheme, t, SignedPerm(perm, np.ones(320, dtype=np.int64)), 1, qerr)


# ---------------------------------------------------------------------------- the table
@needs_ct
def test_capabilities_agree_with_move():
    """Random permutations and random signs: rows saying "exact (" always are; "exact
    if" ones are requantised by a random gauge, which breaks their condition."""
    cases = {
        "gptq": gptq_build(weight(44), 32, False)[:2],
        "gptq-act-order": gptq_build(weight(45), 32, True)[:2],
        "awq": awq_build(weight(46), 64)[:2],
        "ct-int-channel": ct_build(weight(47), None)[:2],
        "ct-int-group": ct_build(weight(48), 32)[:2],
        "fp8-channel": fp8_channel_build(weight(49)),
        "fp8-block": fp8_block_build(weight(50, 256, 256))[:2],
    }
    for row, (scheme, t) in cases.items():
        assert scheme.capability_row == row
        out, inp = hf.logical_shape(scheme, {k: tuple(v.shape) for k, v in t.items()})
        ops = {"writer-permutation": (SignedPerm.random(out, seed=51, kind="perm"), 0),
               "writer-sign": (signs_only(out, seed=52), 0),
               "reader-permutation": (SignedPerm.random(inp, seed=53, kind="perm"), 1),
               "reader-sign": (signs_only(inp, seed=54), 1)}
        for op, (gauge, axis) in ops.items():
            said = hf.CAPABILITIES[row][op]
            how = move(scheme, t, gauge, axis).how
            assert how == ("exact" if said.startswith("exact (") else "requantised"), (row, op)
    assert hf.capability_markdown().count("\n") == len(hf.CAPABILITIES) + 1


# ---------------------------------------------------------------------------- detection
def test_detect_group_and_shape():
    assert hf.detect_scheme({"hidden_size": 8}) is None
    names = ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.qzeros",
             "model.layers.0.self_attn.q_proj.scales", "model.layers.0.self_attn.q_proj.g_idx",
             "model.layers.0.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight"]
    scheme = hf.detect_scheme({"quantization_config": {"quant_method": "gptq", "bits": 4,
                                                       "group_size": 128}}, names)
    assert hf.group_tensors(scheme, names) == {"model.layers.0.self_attn.q_proj.weight": {
        "qweight": names[0], "qzeros": names[1], "scales": names[2], "g_idx": names[3]}}
    fp8 = hf.detect_scheme({"quantization_config": {"quant_method": "fp8",
                                                    "weight_block_size": [128, 128]}})
    fnames = ["a.weight", "a.weight_scale_inv", "model.norm.weight"]
    assert hf.group_tensors(fp8, fnames) == {"a.weight": {"weight": "a.weight",
                                                          "weight_scale_inv": "a.weight_scale_inv"}}
    assert hf.logical_shape(fp8, {"weight": (256, 512), "weight_scale_inv": (2, 4)}) == (256, 512)


def test_refusals_name_format_and_tensor():
    with pytest.raises(GaugefixError, match=r"'bitsandbytes'.*gptq, awq, compressed-tensors"):
        hf.detect_scheme({"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(GaugefixError, match="awq: quantization_config: version 'gemv'"):
        hf.detect_scheme({"quantization_config": {"quant_method": "awq", "version": "gemv"}})
    scheme, t, _, _ = gptq_build(weight(55), 32, False)
    named = {f"model.layers.3.mlp.down_proj.{k}": v for k, v in t.items()}
    with pytest.raises(GaugefixError) as err:
        move(scheme, named, SignedPerm.random(IN, seed=56), 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("gptq: model.layers.3.mlp.down_proj.qweight: the gauge has d=256")
    # a GPTQ v1 zero point of 0 is stored as -1: refused rather than written wrapped
    bad = QuantScheme("gptq", 4, 32, zero_offset=1)
    c = hf._decode(bad, dict(t))
    c.z[0, 0] = 0
    with pytest.raises(GaugefixError, match=r"gptq: x\.qweight: a zero point outside \[1, 16\]"):
        hf._encode(bad, c, dict(t), "x.qweight")
