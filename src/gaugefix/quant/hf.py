"""Exact moves of Hugging Face quantised Linear weights under a gauge.

One Linear's stored tensors (a dict role or stored name -> numpy array or torch tensor)
move under a gauge on the input axis (a reader: q/k/v/gate/up, lm_head) or the output
axis (a writer: o_proj, down_proj) *on the packed data*, where that is exact. Where it is
not, the cells that cannot be carried over (a scale group of one output row, or an FP8
128x128 tile) are requantised from the exactly moved dequantised weight with the
format's own quantiser, and every other cell stays bit-exact; the result reports the
relative error that adds. What neither can do is refused with a one-line
:class:`GaugefixError` naming the format, the tensor and the reason.

Layouts (each checked against its published source):

* ``gptq`` -- AutoGPTQ / transformers / optimum (``qlinear_cuda_old.py``): ``qweight``
  int32 [in*b/32, out] packed along the input, least significant bits first; ``qzeros``
  int32 [groups, out*b/32] packed the same way along the output and holding
  ``zero - 1`` (the "v1" convention; ``checkpoint_format: gptq_v2`` stores the zero
  itself); ``scales`` fp16 [groups, out]; ``g_idx`` int32 [in] (any column -> group).
  ``w[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``.
* ``awq`` -- AutoAWQ GEMM (``awq/modules/linear/gemm.py``, ``awq/utils/packing_utils.py``):
  ``qweight`` int32 [in, out/8] packed along the OUTPUT, nibble k of a word holding column
  ``AWQ_ORDER[k]`` of its eight (``[0, 2, 4, 6, 1, 3, 5, 7]``); ``qzeros`` int32
  [in/g, out/8] the same way (the zero itself); ``scales`` fp16 [in/g, out]; contiguous
  input groups, no g_idx.
* ``ct-int`` -- compressed-tensors ``pack-quantized`` (``pack_quantized/helpers.py``):
  ``weight_packed`` int32 [out, ceil(in*b/32)] packed along the input, codes stored as
  ``code + 2^(b-1)``; ``weight_scale`` [out, 1] (channel) or [out, groups] (group);
  ``weight_zero_point`` (asymmetric only) int32 packed along the OUTPUT (dim 0) the same
  way; ``weight_g_idx`` [in] with act-order; ``weight_shape`` [2].
  ``w[o, i] = scale[o, g] * (code[o, i] - zp[o, g])``.
* ``fp8-channel`` -- compressed-tensors float-quantized, channel strategy: ``weight``
  float8_e4m3fn [out, in], ``weight_scale`` [out, 1]; ``w = weight * scale``.
* ``fp8-block`` -- DeepSeek-V3 / transformers fine-grained FP8 (``weight_scale_inv``) and
  compressed-tensors FP8_BLOCK (``weight_scale``): e4m3 [out, in] with one fp32 scale per
  128x128 tile, ``w = weight * scale[o // 128, i // 128]``.

Decisions (the table :data:`CAPABILITIES` says the same, and the tests hold ``move`` to it):

* Integer formats keep one scale (and zero) per *cell*: one output row by one input
  group. A reader permutation is exact whenever every destination cell draws all its
  columns from source cells of equal scale and zero (a group moved whole, in any order
  inside): the scale/zero rows move with it. GPTQ and compressed-tensors with
  ``weight_g_idx`` accept any column->group map, so any permutation is exact there: the
  columns move with their ``g_idx``. A GPTQ checkpoint without act-order whose
  permutation does not move groups whole gets the permuted ``g_idx`` too, and
  ``desc_act`` must become true (the exllama/marlin kernels ignore ``g_idx`` otherwise):
  reported in ``Moved.config_change``. AWQ, compressed-tensors groups without
  ``weight_g_idx`` and GPTQ checkpoints stored without ``g_idx`` have a fixed grid: the
  cells that mix groups are requantised.
* A reader sign is exact for a group flipped whole (negate that group's scales, as a
  writer sign negates a row's) and for a flipped code ``q`` whose mirror ``2z - q`` is a
  code (symmetric codes: all but ``-2^(b-1)``); any other cell is requantised.
  Negative scales decode the same in every dequantiser and kernel (a product); no
  quantiser writes them.
* FP8 is sign-magnitude: every sign is a sign-bit flip (writers too: scales stay
  positive). FP8 blocks: a permutation is exact on an axis when each destination
  128-block draws from one source block (any order inside, which keeps W8A8's 128-channel
  activation groups whole); the other tiles are requantised with DeepSeek-V3's rule
  (``act_quant``: scale = amax / 448, cast to e4m3).
* ``error`` is the relative Frobenius error of the moved result against the exactly moved
  dequantised weight; ``round_trip_error`` the relative error of requantising every cell
  of the unmoved weight with the same quantiser. For quantisers that reproduce their own
  grid (GPTQ's and AWQ's min-max RTN, the FP8 block rule) the round trip is ~0, so
  ``error`` is what the move adds; for compressed-tensors' symmetric scale
  (``max|w| / (2^(b-1) - 0.5)``) it is not, and a sign-forced requantisation costs exactly
  what the round trip costs in the rows it touches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import GaugefixError
from ..group import SignedPerm

__all__ = [
    "AWQ_ORDER",
    "CAPABILITIES",
    "FORMATS",
    "Moved",
    "QuantScheme",
    "capability_markdown",
    "dequantise",
    "detect_scheme",
    "group_tensors",
    "logical_shape",
    "move",
]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8_MAX = 448.0

# ---------------------------------------------------------------------------- the table
# One row per layout: the roles of its stored tensors (role -> name suffix), which role
# holds the data, which are optional, and what each move does (CAPABILITIES, below).
FORMATS: dict[str, dict[str, Any]] = {
    "gptq": {
        "method": "gptq",
        "roles": {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales",
                  "g_idx": "g_idx"},
        "data": "qweight", "optional": ("g_idx",),
        "quantiser": "GPTQ's Quantizer (min-max RTN per group; no Hessian here)",
    },
    "awq": {
        "method": "awq",
        "roles": {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales"},
        "data": "qweight", "optional": (),
        "quantiser": "AWQ's pseudo_quantize_tensor (min-max RTN with zero point per group; "
                     "the activation-aware scaling is already folded into the weight)",
    },
    "ct-int": {
        "method": "compressed-tensors",
        "roles": {"weight_packed": "weight_packed", "weight_scale": "weight_scale",
                  "weight_zero_point": "weight_zero_point", "weight_g_idx": "weight_g_idx",
                  "weight_shape": "weight_shape"},
        "data": "weight_packed", "optional": ("weight_zero_point", "weight_g_idx"),
        "quantiser": "compressed-tensors' calculate_qparams + quantize",
    },
    "fp8-channel": {
        "method": "compressed-tensors",
        "roles": {"weight": "weight", "weight_scale": "weight_scale"},
        "data": "weight", "optional": (),
        "quantiser": None,
    },
    "fp8-block": {
        "method": "fp8",
        "roles": {"weight": "weight", "weight_scale_inv": "weight_scale_inv"},
        "data": "weight", "optional": (),
        "quantiser": "DeepSeek-V3's block rule (scale = amax / 448 per 128x128 tile, cast "
                     "to e4m3)",
    },
}

_EXACT_WRITERS = {"writer-permutation": "exact (rows move with their scale/zero rows)",
                  "writer-sign": "exact (the row's scales negated)"}
_NOT_EMBEDDING = "not quantised by this format (moves as a float tensor)"
CAPABILITIES: dict[str, dict[str, str]] = {
    "gptq": {
        "reader-permutation": "exact (groups moved whole: scale/zero rows move; otherwise the "
                              "columns move with g_idx and desc_act must be true; with no g_idx "
                              "tensor the mixed cells are requantised)",
        "reader-sign": "exact if each flipped group is flipped whole or every flipped code's "
                       "mirror 2z-q is a code; else those cells requantised (GPTQ RTN)",
        **_EXACT_WRITERS,
        "embedding": _NOT_EMBEDDING,
    },
    "gptq-act-order": {
        "reader-permutation": "exact (columns move with g_idx)",
        "reader-sign": "exact if each flipped group is flipped whole or every flipped code's "
                       "mirror 2z-q is a code; else those cells requantised (GPTQ RTN)",
        **_EXACT_WRITERS,
        "embedding": _NOT_EMBEDDING,
    },
    "awq": {
        "reader-permutation": "exact if every destination group draws from one source group "
                              "(any order inside) or, row by row, from groups of equal scale "
                              "and zero; else those cells requantised (AWQ RTN)",
        "reader-sign": "exact if each flipped group is flipped whole or every flipped code's "
                       "mirror 2z-q is a code; else those cells requantised (AWQ RTN)",
        **_EXACT_WRITERS,
        "embedding": _NOT_EMBEDDING,
    },
    "ct-int-channel": {
        "reader-permutation": "exact (columns move; one scale per row)",
        "reader-sign": "exact if no flipped code is -2^(b-1) (symmetric) / has no mirror "
                       "(asymmetric) in that row; else the row requantised (compressed-tensors)",
        **_EXACT_WRITERS,
        "embedding": "exact as a reader (same rules)",
    },
    "ct-int-group": {
        "reader-permutation": "exact if every destination group draws from one source group "
                              "(any order inside) or, row by row, from groups of equal scale "
                              "and zero; else those cells requantised (compressed-tensors)",
        "reader-sign": "exact if each flipped group is flipped whole or every flipped code's "
                       "mirror 2z-q is a code (symmetric: none is -2^(b-1)); else those "
                       "cells requantised (compressed-tensors)",
        **_EXACT_WRITERS,
        "embedding": "exact as a reader (same rules)",
    },
    "ct-int-group-act-order": {
        "reader-permutation": "exact (columns move with weight_g_idx)",
        "reader-sign": "exact if each flipped group is flipped whole or every flipped code's "
                       "mirror 2z-q is a code (symmetric: none is -2^(b-1)); else those "
                       "cells requantised (compressed-tensors)",
        **_EXACT_WRITERS,
        "embedding": "exact as a reader (same rules)",
    },
    "fp8-channel": {
        "reader-permutation": "exact (columns move; one scale per row)",
        "reader-sign": "exact (e4m3 sign bits)",
        "writer-permutation": "exact (rows move with their scales)",
        "writer-sign": "exact (e4m3 sign bits; scales stay positive)",
        "embedding": "exact as a reader",
    },
    "fp8-block": {
        "reader-permutation": "exact if every 128-column block maps onto one 128-column block "
                              "(any order inside); else those tiles requantised (amax/448)",
        "reader-sign": "exact (e4m3 sign bits)",
        "writer-permutation": "exact if every 128-row block maps onto one 128-row block; else "
                              "those tiles requantised (amax/448)",
        "writer-sign": "exact (e4m3 sign bits; scales stay positive)",
        "embedding": "exact as a reader (same rules)",
    },
}
_SUPPORTED_METHODS = ("gptq", "awq", "compressed-tensors", "fp8")


def rounding_noise_parts(scheme: QuantScheme, rows: np.ndarray) -> tuple[float, float]:
    """The squared error quantising ``rows`` ([r, in]: a Linear's weight rows, grouped along
    the input axis) in ``scheme`` is expected to cost (a uniform grid over each group's range,
    or the e4m3 spacing at each value), and their squared norm: two sums that add over blocks
    of rows (as :func:`gaugefix.quant.gguf_file.rounding_noise_parts` for GGUF types)."""
    x = np.asarray(rows, dtype=np.float64)
    norm = float((x * x).sum())
    if scheme.layout.startswith("fp8"):  # 3 mantissa bits: spacing 2^(e-3) at 2^e <= |x|
        mag = np.abs(x[x != 0])
        spacing = np.exp2(np.floor(np.log2(mag)) - 3)
        return float((spacing ** 2 / 12).sum()), norm
    n = x.shape[-1]
    group = scheme.group_size if scheme.group_size and n % scheme.group_size == 0 else n
    g = x.reshape(-1, n // group, group)
    levels = 2 ** scheme.bits - 1
    span = 2 * np.abs(g).max(-1) if scheme.symmetric else g.max(-1) - g.min(-1)
    step = span / levels
    return float((step ** 2 / 12 * group).sum()), norm


def capability_markdown() -> str:
    """The README table: one row per layout, one column per move."""
    ops = ("reader-permutation", "reader-sign", "writer-permutation", "writer-sign",
           "embedding")
    lines = ["| format | " + " | ".join(ops) + " |", "|---" * (len(ops) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(row[op] for op in ops) + " |"
              for name, row in CAPABILITIES.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the scheme
@dataclass(frozen=True)
class QuantScheme:
    """What a checkpoint's ``quantization_config`` says about its Linear weights."""

    layout: str  # a key of FORMATS
    bits: int
    group_size: int | None = None  # None: one group per row (channel) or n/a
    symmetric: bool = False
    act_order: bool = False  # GPTQ desc_act / compressed-tensors actorder "group"
    zero_offset: int = 0  # GPTQ v1 stores zero - 1
    block: tuple[int, int] | None = None  # FP8 tile (rows, cols)
    scale_role: str | None = None  # FP8 block: weight_scale_inv or weight_scale
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def method(self) -> str:
        return str(FORMATS[self.layout]["method"])

    @property
    def roles(self) -> dict[str, str]:
        roles = dict(FORMATS[self.layout]["roles"])
        if self.layout == "fp8-block" and self.scale_role:
            roles = {"weight": "weight", self.scale_role: self.scale_role}
        return roles

    @property
    def capability_row(self) -> str:
        """The row of CAPABILITIES this scheme's weights follow."""
        if self.layout == "gptq":
            return "gptq-act-order" if self.act_order else "gptq"
        if self.layout == "ct-int":
            if self.group_size is None:
                return "ct-int-channel"
            return "ct-int-group-act-order" if self.act_order else "ct-int-group"
        return self.layout


def _refuse(fmt: str, tensor: str, reason: str) -> GaugefixError:
    return GaugefixError(f"{fmt}: {tensor}: {reason}")


def detect_scheme(config: Mapping[str, Any], tensor_names: Iterable[str] = ()
                  ) -> QuantScheme | None:
    """The scheme of a HF ``config.json`` dict (``None`` for a float checkpoint)."""
    qc = config.get("quantization_config")
    names = list(tensor_names)
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        raise GaugefixError(f"config.json's quantization_config is a {type(qc).__name__}; it "
                            "must be an object (quant_method, bits, group_size, ...)")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        bits = _config_int(qc, "gptq", "bits", 4, allowed=(2, 4, 8))
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        group = _config_int(qc, "gptq", "group_size", -1, lo=-1, hi=1 << 24, not_zero=True)
        return QuantScheme("gptq", bits, None if group <= 0 else group,
                           symmetric=bool(qc.get("sym", True)),
                           act_order=bool(qc.get("desc_act", False)),
                           zero_offset=0 if fmt == "gptq_v2" else 1, config=qc)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse("awq", "quantization_config", f"version {version!r} has another "
                          "packing; only the GEMM layout is supported")
        bits = _config_int(qc, "awq", "bits" if "bits" in qc else "w_bit", 4, allowed=(4,))
        if not qc.get("zero_point", True):
            raise _refuse("awq", "quantization_config", "zero_point: false is not supported")
        group = _config_int(qc, "awq", "group_size" if "group_size" in qc else "q_group_size",
                            128, lo=1, hi=1 << 24)
        return QuantScheme("awq", bits, group, config=qc)
    if method == "compressed-tensors":
        return _detect_ct(qc, names)
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not block:
            raise _refuse("fp8", "quantization_config", "per-tensor FP8 (no weight_block_size) "
                          "is not supported")
        return QuantScheme("fp8-block", 8, block=_block_size(block, "fp8", "weight_block_size"),
                           scale_role="weight_scale_inv", config=qc)
    raise GaugefixError(f"quantisation method {method or '(none)'!r} is not supported; "
                        f"supported: {', '.join(_SUPPORTED_METHODS)}")


def _config_int(qc: Mapping[str, Any], fmt: str, key: str, default: int | None, *,
                allowed: tuple[int, ...] | None = None, lo: int | None = None,
                hi: int | None = None, not_zero: bool = False) -> int:
    """``qc[key]`` as an int, or one error naming the field, its value and the rule (a
    string, a bool, NaN, 1e400 and a fraction are not integers)."""
    value = qc.get(key, default)
    if value is None:
        raise _refuse(fmt, "quantization_config", f"{key} is missing; it must be an integer")
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    n = int(value) if ok else None
    if n is not None and allowed is not None and n not in allowed:
        raise _refuse(fmt, "quantization_config", f"{key} {value!r} is not supported "
                      f"({', '.join(map(str, allowed))} are)")
    if n is None or (lo is not None and n < lo) or (hi is not None and n > hi) or (
            not_zero and n == 0):
        rule = "an integer" + (f" from {lo} to {hi}" if lo is not None and hi is not None
                               else "") + (", not 0" if not_zero else "")
        raise _refuse(fmt, "quantization_config", f"{key} is {value!r}; it must be {rule}")
    return n


def _block_size(block: Any, fmt: str, key: str) -> tuple[int, int]:
    """An FP8 tile: two positive integers."""
    if not isinstance(block, list | tuple) or len(block) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20 for v in block):
        raise _refuse(fmt, "quantization_config", f"{key} is {block!r}; it must be two "
                      "positive integers (rows, columns of a scale's tile)")
    return int(block[0]), int(block[1])


def check_group(scheme: QuantScheme, key: str, shapes: Mapping[str, tuple[int, ...]],
                dtypes: Mapping[str, str]) -> list[str]:
    """One quantised Linear's stored tensors (by role: shapes, safetensors dtype names)
    against the layout's schema: dtypes, ranks and shapes that agree with each other and
    with ``quantization_config`` (groups and tiles that divide the axes). Each problem is a
    line naming the tensor and the rule (empty: the group holds)."""
    problems: list[str] = []
    ints, floats = ("I32", "I64"), ("F16", "BF16", "F32")
    module = key.removesuffix(".weight")

    def need(role: str, kinds: tuple[str, ...], shape: tuple[int | None, ...]) -> None:
        if role not in shapes:
            return
        name = f"{module}.{scheme.roles[role]}"
        got_shape, got = tuple(shapes[role]), dtypes.get(role)
        if got is not None and got not in kinds:
            problems.append(f"{name} is {got}; the {scheme.method} layout stores it as "
                            f"{' or '.join(kinds)}")
        elif len(got_shape) != len(shape) or any(
                w is not None and g != w for g, w in zip(got_shape, shape, strict=False)):
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            problems.append(f"{name} has shape {list(got_shape)}; the layout and "
                            f"quantization_config make it {want}")

    def ceil(a: int, b: int) -> int:
        return -(-a // b)

    per = 32 // scheme.bits if scheme.bits <= 32 else 1
    s = {r: tuple(v) for r, v in shapes.items()}
    data = s.get(FORMATS[scheme.layout]["data"], ())
    if len(data) != 2 or min(data) < 1:
        return [f"{module}.{scheme.roles[FORMATS[scheme.layout]['data']]} has shape "
                f"{list(data)}; the layout stores a non-empty matrix"]
    group = scheme.group_size
    if scheme.layout == "gptq":
        n_out = data[1]
        n_in = s["g_idx"][0] if len(s.get("g_idx", ())) == 1 else data[0] * per
        n_groups = s["scales"][0] if "g_idx" in s and len(s.get("scales", ())) == 2 else \
            ceil(n_in, group or n_in)
        need("qweight", ("I32",), (ceil(n_in, per), n_out))
        need("g_idx", ints, (n_in,))
        need("scales", floats, (n_groups, n_out))
        need("qzeros", ("I32",), (n_groups, ceil(n_out, per)))
    elif scheme.layout == "awq":
        n_in, n_out = data[0], data[1] * per
        if group is not None and n_in % group:
            problems.append(f"{module}: group_size {group} does not divide its {n_in} input "
                            "columns (AWQ's groups are whole)")
            return problems
        n_groups = n_in // (group or n_in)
        need("qweight", ("I32",), (n_in, n_out // per))
        need("qzeros", ("I32",), (n_groups, n_out // per))
        need("scales", floats, (n_groups, n_out))
    elif scheme.layout == "ct-int":
        n_out = data[0]
        n_in = s["weight_g_idx"][0] if len(s.get("weight_g_idx", ())) == 1 else data[1] * per
        n_groups = (s["weight_scale"][1] if "weight_g_idx" in s
                    and len(s.get("weight_scale", ())) == 2 else 1 if group is None
                    else None)
        need("weight_packed", ("I32",), (n_out, None if "weight_g_idx" not in s
                                         else ceil(n_in, per)))
        need("weight_shape", ints, (2,))
        need("weight_g_idx", ints, (n_in,))
        need("weight_scale", floats, (n_out, n_groups))
        need("weight_zero_point", ("I32",), (ceil(n_out, per), n_groups))
    elif scheme.layout == "fp8-channel":
        need("weight", ("F8_E4M3",), data)
        need("weight_scale", floats, (data[0], 1))
    elif scheme.layout == "fp8-block":
        assert scheme.block is not None and scheme.scale_role is not None
        need("weight", ("F8_E4M3",), data)
        need(scheme.scale_role, floats, (ceil(data[0], scheme.block[0]),
                                         ceil(data[1], scheme.block[1])))
    return problems


def check_values(scheme: QuantScheme, key: str, read: Callable[[str], torch.Tensor],
                 roles: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
                 ) -> list[str]:
    """The index tensors of one group (read with ``read(stored name)``: g_idx, weight_g_idx,
    weight_shape; a few KB) against the layout: every column in a stored group, the grid
    ``group_size`` makes where the kernels ignore g_idx (GPTQ without desc_act), a
    weight_shape that the packed codes hold. Problems as lines (empty: they hold)."""
    problems: list[str] = []
    module = key.removesuffix(".weight")
    if scheme.layout == "gptq" and "g_idx" in roles:
        gidx = read(roles["g_idx"]).to(torch.int64)
        bad = _gidx_problem(gidx, gidx.shape[0], shapes[roles["scales"]][0])
        if bad is not None:
            return [f"{module}.g_idx: {bad}"]
        grid = _grid(gidx.shape[0], scheme.group_size)
        if not scheme.act_order and not torch.equal(gidx, grid):
            problems.append(f"{module}.g_idx is not the grid of group_size "
                            f"{scheme.group_size or -1} and desc_act is false (the kernels "
                            "then ignore g_idx, so the two must agree)")
    if scheme.layout == "ct-int":
        n_out, n_in = (int(v) for v in read(roles["weight_shape"]).tolist())
        bad = _shape_problem(n_out, n_in, tuple(shapes[roles["weight_packed"]]), scheme.bits)
        if bad is not None:
            problems.append(f"{module}.weight_shape {bad}")
        elif "weight_g_idx" in roles:
            bad = _gidx_problem(read(roles["weight_g_idx"]).to(torch.int64), n_in,
                                shapes[roles["weight_scale"]][1])
            if bad is not None:
                problems.append(f"{module}.weight_g_idx: {bad}")
    return problems


def _detect_ct(qc: Mapping[str, Any], names: list[str]) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    schemes = [g.get("weights") for g in groups.values() if g.get("weights")]
    if not schemes:
        raise _refuse("compressed-tensors", "quantization_config", "no weight scheme in "
                      "config_groups")
    if any(s != schemes[0] for s in schemes[1:]):
        raise _refuse("compressed-tensors", "quantization_config", "config groups with "
                      "different weight schemes are not supported")
    w = schemes[0]
    if not isinstance(w, Mapping):
        raise _refuse("compressed-tensors", "quantization_config", "config_groups' weights "
                      f"is a {type(w).__name__}, not an object")
    fmt = str(qc.get("format", ""))
    wtype, strategy = w.get("type", "int"), w.get("strategy")
    bits = _config_int(w, "compressed-tensors", "num_bits", 8, lo=1, hi=32)
    if wtype == "int" and fmt == "pack-quantized" and bits in (2, 4, 8):
        if strategy not in ("channel", "group"):
            raise _refuse("compressed-tensors", "quantization_config", f"int strategy "
                          f"{strategy!r} is not supported (channel and group are)")
        act = w.get("actorder") in ("group", True) or any(n.endswith("weight_g_idx")
                                                          for n in names)
        return QuantScheme("ct-int", bits,
                           _config_int(w, "compressed-tensors", "group_size", None, lo=1,
                                       hi=1 << 24) if strategy == "group" else None,
                           symmetric=bool(w.get("symmetric", True)), act_order=act, config=qc)
    if wtype == "float" and bits == 8 and strategy == "channel":
        return QuantScheme("fp8-channel", 8, symmetric=True, config=qc)
    if wtype == "float" and bits == 8 and strategy == "block":
        block = w.get("block_structure") or [128, 128]
        return QuantScheme("fp8-block", 8, block=_block_size(block, "compressed-tensors",
                                                             "block_structure"),
                           scale_role="weight_scale", config=qc)
    raise _refuse("compressed-tensors", "quantization_config", f"{wtype} {bits}-bit "
                  f"{strategy} in format {fmt!r} is not supported (pack-quantized int "
                  "channel/group, float8 channel and block are)")


def group_tensors(scheme: QuantScheme, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Logical weight key (``<module>.weight``) -> {role: stored tensor name}, for every
    Linear the scheme quantised (a module counts when its data and scale tensors exist)."""
    roles = scheme.roles
    pattern = re.compile(r"^(.*)\.(" + "|".join(map(re.escape, roles.values())) + r")$")
    by_module: dict[str, dict[str, str]] = {}
    for name in names:
        m = pattern.match(name)
        if m:
            role = next(r for r, suffix in roles.items() if suffix == m.group(2))
            by_module.setdefault(m.group(1), {})[role] = name
    optional = set(FORMATS[scheme.layout]["optional"])
    out = {}
    for module, found in sorted(by_module.items()):
        if all(r in found for r in roles if r not in optional):
            out[f"{module}.weight"] = found
    return out


def logical_shape(scheme: QuantScheme, shapes: Mapping[str, tuple[int, ...]]
                  ) -> tuple[int, int]:
    """The dequantised [out, in] shape from the group's stored shapes (by role or name)."""
    s = {_role_of(scheme, k): tuple(v) for k, v in shapes.items()}
    per = 32 // scheme.bits
    if scheme.layout == "gptq":
        return s["qweight"][1], (s["g_idx"][0] if "g_idx" in s else s["qweight"][0] * per)
    if scheme.layout == "awq":
        return s["qweight"][1] * per, s["qweight"][0]
    if scheme.layout == "ct-int":
        if "weight_g_idx" in s:
            return s["weight_packed"][0], s["weight_g_idx"][0]
        # channel: exact when in is a multiple of 32 / bits (weight_shape holds the rest)
        return s["weight_packed"][0], s["weight_packed"][1] * per
    return s["weight"][0], s["weight"][1]


# ---------------------------------------------------------------------------- tensors in/out
def _role_of(scheme: QuantScheme, key: str) -> str:
    roles = scheme.roles
    if key in roles:
        return key
    for role, suffix in roles.items():
        if key.endswith("." + suffix):
            return role
    raise _refuse(scheme.method, key, f"not a tensor of this format (roles: "
                  f"{', '.join(roles)})")


def _torch(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _like(orig: Any, new: torch.Tensor) -> Any:
    new = new.contiguous()
    return new.numpy() if isinstance(orig, np.ndarray) else new


def _by_role(scheme: QuantScheme, tensors: Mapping[str, Any]
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    byrole, names = {}, {}
    for key, value in tensors.items():
        role = _role_of(scheme, key)
        byrole[role], names[role] = _torch(value), key
    return byrole, names


# ---------------------------------------------------------------------------- packing
def _unpack(packed: torch.Tensor, bits: int, axis: int, n: int) -> torch.Tensor:
    """Unsigned b-bit fields of int32 words, least significant first, along ``axis``."""
    per, mask = 32 // bits, (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if axis == 0:
        v = (p.unsqueeze(1) >> shifts[None, :, None]) & mask
        return v.reshape(p.shape[0] * per, p.shape[1])[:n]
    v = (p.unsqueeze(2) >> shifts[None, None, :]) & mask
    return v.reshape(p.shape[0], p.shape[1] * per)[:, :n]


def _pack(values: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    per = 32 // bits
    v = values.to(torch.int64)
    if axis == 0:
        v = v.T
    pad = -v.shape[1] % per
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v.reshape(v.shape[0], -1, per) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.T.contiguous() if axis == 0 else words


def _awq_columns(n: int) -> torch.Tensor:
    """Column held by each unpacked (least significant first) field of AWQ's packing."""
    return (torch.arange(n).view(-1, 8)[:, list(AWQ_ORDER)]).reshape(-1)


# ---------------------------------------------------------------------------- integer codes
@dataclass
class _Codes:
    """An integer format decoded: ``w[o, i] = s[o, g] * (q[o, i] - z[o, g])``, g = gidx[i]."""

    q: torch.Tensor  # int64 [out, in]
    s: torch.Tensor  # [out, groups], stored dtype
    z: torch.Tensor | None  # int64 [out, groups]; None: always 0
    gidx: torch.Tensor  # int64 [in]
    qmin: int
    qmax: int

    def dequantise(self) -> torch.Tensor:
        zero = 0 if self.z is None else self.z[:, self.gidx]
        return self.s.float()[:, self.gidx] * (self.q - zero).float()


def _grid(n: int, group: int | None) -> torch.Tensor:
    return torch.arange(n) // (group or n)


def _decode(scheme: QuantScheme, t: dict[str, torch.Tensor]) -> _Codes:
    b, mask = scheme.bits, (1 << scheme.bits) - 1
    if scheme.layout == "gptq":
        n_in, n_out = t["qweight"].shape[0] * (32 // b), t["qweight"].shape[1]
        q = _unpack(t["qweight"], b, 0, n_in).T
        z = _unpack(t["qzeros"], b, 1, n_out).T + scheme.zero_offset
        gidx = (t["g_idx"].to(torch.int64) if "g_idx" in t
                else _grid(n_in, scheme.group_size))
        if (bad := _gidx_problem(gidx, n_in, t["scales"].shape[0])) is not None:
            raise _refuse(scheme.method, "g_idx", bad)
        return _Codes(q, t["scales"].T, z, gidx, 0, mask)
    if scheme.layout == "awq":
        n_in, n_out = t["qweight"].shape[0], t["qweight"].shape[1] * (32 // b)
        cols = _awq_columns(n_out)
        q = torch.empty(n_in, n_out, dtype=torch.int64)
        q[:, cols] = _unpack(t["qweight"], b, 1, n_out)
        z = torch.empty(t["qzeros"].shape[0], n_out, dtype=torch.int64)
        z[:, cols] = _unpack(t["qzeros"], b, 1, n_out)
        return _Codes(q.T, t["scales"].T, z.T, _grid(n_in, scheme.group_size), 0, mask)
    if scheme.layout == "ct-int":
        n_out, n_in = (int(v) for v in t["weight_shape"].tolist())
        if (bad := _shape_problem(n_out, n_in, tuple(t["weight_packed"].shape), b)) is not None:
            raise _refuse(scheme.method, "weight_shape", bad)
        off = 1 << (b - 1)
        q = _unpack(t["weight_packed"], b, 1, n_in) - off
        s = t["weight_scale"]
        z = None
        if "weight_zero_point" in t:
            z = _unpack(t["weight_zero_point"], b, 0, n_out) - off
        gidx = (t["weight_g_idx"].to(torch.int64) if "weight_g_idx" in t
                else _grid(n_in, scheme.group_size))
        if (bad := _gidx_problem(gidx, n_in, s.shape[1])) is not None:
            raise _refuse(scheme.method, "weight_g_idx", bad)
        return _Codes(q, s, z, gidx, -off, off - 1)
    raise AssertionError(scheme.layout)


def _gidx_problem(gidx: torch.Tensor, n_in: int, n_groups: int) -> str | None:
    """What is wrong with a column -> group map (None: one entry per input column, each a
    stored group); read at open (:func:`check_values`) and again when decoding."""
    if gidx.shape != (n_in,):
        return f"has {gidx.shape[0] if gidx.ndim else 0} entries for {n_in} input columns"
    if n_in and (int(gidx.min()) < 0 or int(gidx.max()) >= n_groups):
        return (f"holds groups {int(gidx.min())}..{int(gidx.max())}; its scales have "
                f"{n_groups} (0..{n_groups - 1})")
    return None


def _shape_problem(n_out: int, n_in: int, packed: tuple[int, ...], bits: int) -> str | None:
    """What is wrong with a compressed-tensors weight_shape (None: its packed codes hold
    exactly [n_out, n_in])."""
    if n_out != packed[0] or n_in <= 0 or -(-n_in * bits // 32) != packed[1]:
        return (f"says [{n_out}, {n_in}], which its weight_packed of shape {list(packed)} "
                f"({bits}-bit codes) cannot hold")
    return None


def _encode(scheme: QuantScheme, c: _Codes, t: dict[str, torch.Tensor], name: str
            ) -> dict[str, torch.Tensor]:
    b, out = scheme.bits, dict(t)
    if c.z is not None:
        zmin, zmax = ((scheme.zero_offset, (1 << b) - 1 + scheme.zero_offset)
                      if scheme.layout != "ct-int" else (c.qmin, c.qmax))
        if c.z.numel() and (c.z.min() < zmin or c.z.max() > zmax):
            raise _refuse(scheme.method, name, f"a zero point outside [{zmin}, {zmax}] "
                          "cannot be stored")
    if scheme.layout == "gptq":
        out["qweight"] = _pack(c.q.T, b, 0)
        out["qzeros"] = _pack(c.z.T - scheme.zero_offset, b, 1)
        out["scales"] = c.s.T.contiguous()
        if "g_idx" in t:
            out["g_idx"] = c.gidx.to(t["g_idx"].dtype)
    elif scheme.layout == "awq":
        cols = _awq_columns(c.q.shape[0])
        out["qweight"] = _pack(c.q.T[:, cols], b, 1)
        out["qzeros"] = _pack(c.z.T[:, cols], b, 1)
        out["scales"] = c.s.T.contiguous()
    else:
        off = 1 << (b - 1)
        out["weight_packed"] = _pack(c.q + off, b, 1)
        out["weight_scale"] = c.s.contiguous()
        if c.z is not None:
            out["weight_zero_point"] = _pack(c.z + off, b, 0)
        if "weight_g_idx" in t:
            out["weight_g_idx"] = c.gidx.to(t["weight_g_idx"].dtype)
    return out


# ---------------------------------------------------------------------------- quantisers
def _rtn_gptq(x: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype):
    """AutoGPTQ ``Quantizer.find_params`` + ``quantize`` per row of ``x`` (RTN)."""
    maxq = (1 << bits) - 1
    xmin = torch.clamp(x.amin(1), max=0)
    xmax = torch.clamp(x.amax(1), min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(dtype)
    zero = (torch.full_like(xmin, (maxq + 1) // 2) if sym
            else torch.round(-xmin / scale.float()))
    q = torch.clamp(torch.round(x / scale.float()[:, None]) + zero[:, None], 0, maxq)
    return q.to(torch.int64), scale, zero.to(torch.int64)


def _rtn_awq(x: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype):
    """AutoAWQ ``pseudo_quantize_tensor`` (zero_point=True) per row of ``x``."""
    max_int = (1 << bits) - 1
    scale = ((x.amax(1) - x.amin(1)).clamp(min=1e-5) / max_int).to(dtype)
    zero = (-torch.round(x.amin(1) / scale.float())).clamp(0, max_int)
    q = torch.clamp(torch.round(x / scale.float()[:, None]) + zero[:, None], 0, max_int)
    return q.to(torch.int64), scale, zero.to(torch.int64)


def _rtn_ct(x: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype):
    """compressed-tensors' own ``calculate_qparams`` + ``quantize`` per row of ``x``."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel")
    scale, zp = calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)
    scale = scale.to(dtype)
    q = quantize(x, scale.float(), zp if not sym else None, args, dtype=torch.int8)
    return q.to(torch.int64), scale[:, 0], zp[:, 0].round().to(torch.int64)


_QUANTISERS = {"gptq": _rtn_gptq, "awq": _rtn_awq, "ct-int": _rtn_ct}


def _quantiser(scheme: QuantScheme, name: str):
    if scheme.layout == "ct-int":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise _refuse(scheme.method, name, "this move needs requantising and the "
                          "compressed-tensors package (its quantiser) is not installed"
                          ) from None
    return _QUANTISERS[scheme.layout]


def _requantise_cells(scheme: QuantScheme, c: _Codes, target: torch.Tensor,
                      cells: torch.Tensor, name: str) -> None:
    """Requantise, in place, the (row, group) ``cells`` of ``c`` from float ``target``."""
    rtn = _quantiser(scheme, name)
    for g in torch.nonzero(cells.any(0)).flatten().tolist():
        rows = torch.nonzero(cells[:, g]).flatten()
        cols = torch.nonzero(c.gidx == g).flatten()
        q, s, z = rtn(target[rows][:, cols], scheme.bits, scheme.symmetric, c.s.dtype)
        c.q[rows.unsqueeze(1), cols.unsqueeze(0)] = q
        c.s[rows, g] = s
        if c.z is not None:
            c.z[rows, g] = z


# ---------------------------------------------------------------------------- moved
@dataclass
class Moved:
    """One Linear's tensors after a move (same names and, but for GPTQ's g_idx, shapes)."""

    tensors: dict[str, Any]
    how: Literal["exact", "requantised"]
    error: float | None = None  # relative Frobenius error vs the exactly moved weight
    round_trip_error: float | None = None  # the same quantiser on the unmoved weight
    config_change: dict[str, Any] = field(default_factory=dict)  # quantization_config keys
    requantised_cells: int = 0  # scale cells (row x group, or FP8 tiles) requantised


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(torch.linalg.norm(b.double()))
    return float(torch.linalg.norm((a - b).double())) / den if den else 0.0


def dequantise(scheme: QuantScheme, tensors: Mapping[str, Any]) -> torch.Tensor:
    """The float32 [out, in] weight one Linear's stored tensors encode."""
    t, _ = _by_role(scheme, tensors)
    if scheme.layout in _QUANTISERS:
        return _decode(scheme, t).dequantise()
    w = t["weight"].float()
    if scheme.layout == "fp8-channel":
        return w * t["weight_scale"].float().reshape(-1, 1)
    s = t[scheme.scale_role or "weight_scale_inv"].float()
    bo, bi = scheme.block or (128, 128)
    return w * s.repeat_interleave(bo, 0)[: w.shape[0]].repeat_interleave(bi, 1)[:, : w.shape[1]]


def move(scheme: QuantScheme, tensors: Mapping[str, Any], gauge: SignedPerm, axis: int,
         signed: bool = True) -> Moved:
    """Move one Linear's stored tensors under ``gauge`` on ``axis`` (1: the input, a
    reader; 0: the output, a writer). See the module docstring for what is exact."""
    t, names = _by_role(scheme, tensors)
    name = names[FORMATS[scheme.layout]["data"]]
    if axis not in (0, 1):
        raise _refuse(scheme.method, name, f"axis must be 0 (writer) or 1 (reader), got {axis}")
    n = logical_shape(scheme, {r: tuple(v.shape) for r, v in t.items()})[axis]
    if scheme.layout == "ct-int":
        n = int(t["weight_shape"][axis])
    if gauge.d != n:
        raise _refuse(scheme.method, name, f"the gauge has d={gauge.d} but axis {axis} has "
                      f"{n} entries")
    if not signed:
        gauge = gauge.unsigned()
    if scheme.layout in _QUANTISERS:
        new, how, err, rt, change, cells = _move_int(scheme, t, gauge, axis, name)
    else:
        new, how, err, rt, cells = _move_fp8(scheme, t, gauge, axis, name)
        change = {}
    out = {names[r]: _like(tensors[names[r]], v) for r, v in new.items()}
    return Moved(out, how, err, rt, change, cells)


def _move_int(scheme: QuantScheme, t: dict[str, torch.Tensor], gauge: SignedPerm,
              axis: int, name: str):
    c = _decode(scheme, t)
    perm = torch.from_numpy(gauge.perm.astype(np.int64))
    flip = torch.from_numpy(gauge.sign < 0)
    change: dict[str, Any] = {}
    if axis == 0:  # writer: rows whole, scales negated
        s = c.s[perm].clone()
        s[flip] = -s[flip]
        moved = _Codes(c.q[perm], s, None if c.z is None else c.z[perm], c.gidx, c.qmin, c.qmax)
        return _encode(scheme, moved, t, name), "exact", None, None, change, 0
    # any column->group map can be stored where the checkpoint holds one (else: fixed grid)
    free = "g_idx" in t or "weight_g_idx" in t
    moved, cells = _reader_codes(scheme, c, perm, flip, free)
    if not torch.equal(moved.gidx, c.gidx) and scheme.layout == "gptq" and not scheme.act_order:
        change["desc_act"] = True
    if not cells.any():
        return _encode(scheme, moved, t, name), "exact", None, None, change, 0
    before = c.dequantise()
    target = gauge.apply(before, 1, True)
    _requantise_cells(scheme, moved, target, cells, name)
    again = _Codes(c.q.clone(), c.s.clone(), None if c.z is None else c.z.clone(), c.gidx,
                   c.qmin, c.qmax)
    _requantise_cells(scheme, again, before, torch.ones_like(cells), name)
    err, rt = _rel(moved.dequantise(), target), _rel(again.dequantise(), before)
    return (_encode(scheme, moved, t, name), "requantised", err, rt, change,
            int(cells.sum()))


def _reader_codes(scheme: QuantScheme, c: _Codes, perm: torch.Tensor, flip: torch.Tensor,
                  free: bool) -> tuple[_Codes, torch.Tensor]:
    """The codes moved on the input axis; the (row, group) cells that still need requantising."""
    n_in, groups = c.q.shape[1], c.s.shape[1]
    q, src = c.q[:, perm].clone(), c.gidx[perm]
    s = c.s.clone()
    z = None if c.z is None else c.z.clone()
    cells = torch.zeros(c.q.shape[0], groups, dtype=torch.bool)
    grid = _grid(n_in, scheme.group_size)
    gidx = grid
    if not torch.equal(c.gidx, grid):  # act-order: the columns take their groups along
        gidx = src
    else:
        for k in range(groups):
            from_ = torch.unique(src[grid == k])
            if from_.numel() == 1:  # a group moved whole
                s[:, k] = c.s[:, from_[0]]
                if z is not None:
                    z[:, k] = c.z[:, from_[0]]
                continue
            if free:  # any column->group map is stored: keep every column's own group
                gidx, s = src, c.s.clone()
                z = None if c.z is None else c.z.clone()
                cells[:] = False
                break
            ss = c.s[:, from_]
            same = (ss == ss[:, :1]).all(1)
            if z is not None:
                zz = c.z[:, from_]
                same &= (zz == zz[:, :1]).all(1)
                z[:, k] = zz[:, 0]
            s[:, k] = ss[:, 0]
            cells[:, k] = ~same
    if flip.any():
        zero = torch.zeros_like(q) if z is None else z[:, gidx]
        for g in torch.unique(gidx[flip]).tolist():
            cols = gidx == g
            if flip[cols].all():  # the group flipped whole: negate its scales
                s[:, g] = -s[:, g]
                continue
            fc = torch.nonzero(cols & flip).flatten()
            mirror = 2 * zero[:, fc] - q[:, fc]
            ok = ((mirror >= c.qmin) & (mirror <= c.qmax)).all(1)
            q[:, fc] = torch.where(ok.unsqueeze(1), mirror, q[:, fc])
            cells[:, g] |= ~ok
    return _Codes(q, s, z, gidx, c.qmin, c.qmax), cells


# ---------------------------------------------------------------------------- FP8
def _fp8_quant_tile(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 ``act_quant``'s rule on one tile: scale = amax / 448, then cast."""
    amax = x.abs().amax().float()
    s = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
    return (x / s).to(torch.float8_e4m3fn), s


def _move_fp8(scheme: QuantScheme, t: dict[str, torch.Tensor], gauge: SignedPerm, axis: int,
              name: str):
    w = t["weight"]
    if scheme.layout == "fp8-channel":
        new = dict(t)
        new["weight"] = gauge.apply(w, axis, True)
        if axis == 0:
            new["weight_scale"] = gauge.apply(t["weight_scale"], 0, False)
        return new, "exact", None, None, 0
    role = scheme.scale_role or "weight_scale_inv"
    sc = t[role]
    block = (scheme.block or (128, 128))[axis]
    n = w.shape[axis]
    perm = torch.from_numpy(gauge.perm.astype(np.int64))
    src = perm // block
    dest = torch.arange(n) // block
    mapping, bad = [], []
    for k in range(sc.shape[axis]):
        from_ = torch.unique(src[dest == k])
        whole = from_.numel() == 1 and int((src == from_[0]).sum()) == int((dest == k).sum())
        mapping.append(int(from_[0]))
        if not whole:
            bad.append(k)
    new = dict(t)
    new["weight"] = gauge.apply(w, axis, True)  # every sign is a sign-bit flip
    new[role] = sc.index_select(axis, torch.tensor(mapping))
    if not bad:
        return new, "exact", None, None, 0
    before = dequantise(scheme, t)
    target = gauge.apply(before, axis, True)
    moved_w, moved_s = new["weight"].clone(), new[role].clone()
    again_w, again_s = w.clone(), sc.clone()
    bo, bi = scheme.block or (128, 128)
    for r in range(sc.shape[0]):
        for k in range(sc.shape[1]):
            rows, cols = slice(r * bo, (r + 1) * bo), slice(k * bi, (k + 1) * bi)
            again_w[rows, cols], s = _fp8_quant_tile(before[rows, cols])
            again_s[r, k] = s
            if (k if axis == 1 else r) in bad:
                moved_w[rows, cols], s = _fp8_quant_tile(target[rows, cols])
                moved_s[r, k] = s
    new["weight"], new[role] = moved_w, moved_s
    err = _rel(dequantise(scheme, {"weight": moved_w, role: moved_s}), target)
    rt = _rel(dequantise(scheme, {"weight": again_w, role: again_s}), before)
    cells = len(bad) * sc.shape[1 - axis]
    return new, "requantised", err, rt, cells

