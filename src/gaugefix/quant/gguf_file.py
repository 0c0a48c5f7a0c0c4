"""GGUF files (llama.cpp's format) as models: read, dequantised for estimation, moved.

A GGUF file is opened through gguf-py's own reader (:class:`gguf.GGUFReader`, memory-mapped).
Its config is transformers' reading of the metadata (``load_gguf_checkpoint``), its tensor
names map onto the family table's Hugging Face names through transformers' map, which is
built on gguf-py's own name table (``gguf.get_tensor_name_map`` / ``MODEL_TENSORS``): no second
table is written here. A tensor read for estimation is gguf-py's dequantisation, processed as
transformers processes it when it loads the file (llama.cpp's q/k row order undone, Gemma's
``1 + w`` norms), so that every weight gaugefix reads is the one the loaded module holds.

Moving a tensor (``apply``, the canonical chart, the fingerprint) works on the packed data
where the layout allows it exactly (see :data:`LAYOUTS`, one row per GGML type):

- along a tensor's rows (the residual is the output axis of ``attn_output``/``ffn_down``,
  GGUF's outer axes), rows move whole, bytes as they are; a row's sign is the sign of its
  blocks' float scales (``d``, and ``m``/``dmin`` where a value is ``d·q + m``), flipped in
  place, or of its elements where the scale is unsigned (MXFP4's E8M0: E2M1 sign bits);
- along the blocks (readers and embeddings: the residual is the input axis, GGUF's inner
  axis, cut into blocks of 32 or 256), a gauge that maps each block onto a whole block in
  order, with one sign per block, moves blocks whole; for element codes with a symmetric code
  set (Q8_0's ``[-127, 127]``, MXFP4's sign-magnitude E2M1) any gauge that maps each block
  onto a whole block moves the codes themselves;
- any other gauge along the blocks is not exact in the format: the tensor is dequantised,
  moved and requantised with gguf-py's reference quantiser (``gguf.quants.quantize``), and the
  relative error that adds is recorded against a plain round trip (the unmoved tensor
  requantised the same way); a type gguf-py cannot quantise (K-quants, IQ types, NVFP4) is
  refused with the reason.

Every move goes through the one primitive, :meth:`SignedPerm.apply`: the gather of rows,
blocks or codes, and the sign of float bits; only a sign that lives in a packed field (a
scale's sign bit, an E2M1 nibble) is flipped by the layout's table.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GaugefixError
from ..group import SignedPerm

if TYPE_CHECKING:
    import gguf
    import torch

    from ..arch import Op

SUFFIX = ".gguf"


# ---------------------------------------------------------------------------- the layouts
@dataclass(frozen=True)
class Layout:
    """Where a GGML type keeps its signs (ggml's ``ggml-common.h``; each row checked against
    gguf-py's dequantisation in the tests).

    ``scales``: byte offsets, within a block, of the fp16 fields whose negation negates the
    whole block (``d``; ``m``/``dmin`` where a value is ``d·q + m`` or ``d·q − dmin·m``);
    ``xor``: where the scale is unsigned, the byte range of sign-magnitude codes and the mask
    that flips every element's sign; ``codes``: element codes that move one by one along the
    blocks ("int8": Q8_0's symmetric ``[-127, 127]`` at ``code_offset``; "e2m1": MXFP4's
    nibbles, element ``j`` low and ``j + 16`` high); ``bits``: code bits (quantisation noise
    expected of the type, for ``identify``)."""

    scales: tuple[int, ...] = ()
    xor: tuple[int, int, int] | None = None  # (first byte, end byte, mask)
    codes: str | None = None
    code_offset: int = 0
    bits: int = 16


LAYOUTS: dict[str, Layout] = {
    "F32": Layout(bits=32), "F16": Layout(bits=16), "BF16": Layout(bits=16),
    "F64": Layout(bits=64),
    "Q4_0": Layout((0,), bits=4), "Q4_1": Layout((0, 2), bits=4),
    "Q5_0": Layout((0,), bits=5), "Q5_1": Layout((0, 2), bits=5),
    "Q8_0": Layout((0,), codes="int8", code_offset=2, bits=8),
    "Q2_K": Layout((80, 82), bits=2), "Q3_K": Layout((108,), bits=3),
    "Q4_K": Layout((0, 2), bits=4), "Q5_K": Layout((0, 2), bits=5),
    "Q6_K": Layout((208,), bits=6),
    "IQ2_XXS": Layout((0,), bits=2), "IQ2_XS": Layout((0,), bits=2),
    "IQ2_S": Layout((0,), bits=2), "IQ3_XXS": Layout((0,), bits=3),
    "IQ3_S": Layout((0,), bits=3), "IQ1_S": Layout((0,), bits=1),
    "IQ4_NL": Layout((0,), bits=4), "IQ4_XS": Layout((0,), bits=4),
    "TQ1_0": Layout((52,), bits=2), "TQ2_0": Layout((64,), bits=2),
    "MXFP4": Layout(xor=(1, 17, 0x88), codes="e2m1", code_offset=1, bits=4),
}  # NVFP4, Q1_0: not here (gguf-py cannot dequantise them to check a row against)
# float types: numpy integer dtype of their bits (the sign is the top bit)
_FLOAT_BITS = {"F32": np.int32, "F16": np.int16, "BF16": np.int16, "F64": np.int64}


def _type_name(ttype: Any) -> str:
    return getattr(ttype, "name", str(ttype))


@cache
def quantisable() -> tuple[str, ...]:
    """The GGML types gguf-py's reference quantiser writes (requantising is possible); asked
    of gguf-py once."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    out = []
    for t in T:
        if t.name in _FLOAT_BITS or t.name not in LAYOUTS:
            continue
        try:
            quants.quantize(np.zeros((1, quants.GGML_QUANT_SIZES[t][0]), np.float32), t)
        except NotImplementedError:
            continue
        out.append(t.name)
    return tuple(out)


@dataclass
class TensorMove:
    """What happened to one tensor: ``exact`` (moved on the packed data, or untouched) or
    ``requantised`` (``error``: relative Frobenius error of the result against the exactly
    moved dequantised tensor; ``round_trip``: the same quantiser's error on the unmoved
    tensor)."""

    name: str
    type: str
    how: str
    error: float | None = None
    round_trip: float | None = None

    def to_dict(self, round_trip: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor": self.name, "type": self.type, "how": self.how}
        if self.error is not None:
            out["error"] = float(f"{self.error:.4g}")
        if round_trip and self.round_trip is not None:
            out["round_trip"] = float(f"{self.round_trip:.4g}")
        return out


def _block_size(tname: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[tname]]


def _negate_fields(blocks: np.ndarray, layout: Layout, where: np.ndarray) -> None:
    """Negate, in place, the blocks selected by ``where`` (a mask broadcast over the blocks'
    leading axes): their fp16 scales' sign bits, or their codes' sign bits."""
    sel = blocks[where]
    for off in layout.scales:
        sel[..., off + 1] ^= 0x80  # little-endian fp16: the sign is bit 7 of the high byte
    if layout.xor is not None:
        lo, hi, mask = layout.xor
        sel[..., lo:hi] ^= mask
    blocks[where] = sel


def _move_rows(data: np.ndarray, tname: str, axis: int, gauge: SignedPerm,
               signed: bool) -> np.ndarray:
    """Along an outer axis (rows of a writer): whole rows, the sign in the scales."""
    if tname in _FLOAT_BITS:
        bits = data.view(np.uint8).view(_FLOAT_BITS[tname]) if tname == "BF16" else \
            data.view(_FLOAT_BITS[tname])
        return gauge.apply(bits, axis, signed, bits=True).view(data.dtype)
    layout = _layout(tname)
    out = np.ascontiguousarray(gauge.apply(data, axis, False))
    if signed and (gauge.sign < 0).any():
        _, nbytes = _block_size(tname)
        blocks = out.reshape(*out.shape[:-1], -1, nbytes)
        shape = [1] * blocks.ndim
        shape[axis] = gauge.d
        where = np.broadcast_to((gauge.sign < 0).reshape(shape[:-1]), blocks.shape[:-1])
        _negate_fields(blocks, layout, where)
    return out


def _layout(tname: str) -> Layout:
    if tname not in LAYOUTS:
        raise GaugefixError(f"GGML type {tname} is not one gaugefix knows how to move "
                            f"(known: {', '.join(LAYOUTS)})")
    return LAYOUTS[tname]


def _block_map(gauge: SignedPerm, block: int) -> tuple[np.ndarray, bool, bool] | None:
    """``(source block of each block, in order, one sign per block)`` when every block of
    the result draws all its elements from one block of the source; None otherwise."""
    d = gauge.d
    if d % block:
        return None
    src = gauge.perm.reshape(-1, block) // block
    if not (src == src[:, :1]).all():
        return None
    k = np.arange(block)
    in_order = bool((gauge.perm.reshape(-1, block) % block == k).all())
    sg = gauge.sign.reshape(-1, block)
    uniform = bool((sg == sg[:, :1]).all())
    return src[:, 0], in_order, uniform


def _move_codes(data: np.ndarray, tname: str, gauge: SignedPerm, signed: bool,
                src: np.ndarray) -> np.ndarray | None:
    """Q8_0 / MXFP4 along the blocks: each block's scale from its source block, the element
    codes gathered (and signed) one by one. None if a code has no negation (-128)."""
    layout = LAYOUTS[tname]
    block, nbytes = _block_size(tname)
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, -1, nbytes)
    per_block = SignedPerm(src, np.ones_like(src))
    out = np.ascontiguousarray(per_block.apply(blocks, blocks.ndim - 2, False))
    lo = layout.code_offset
    if layout.codes == "int8":
        codes = blocks[..., lo:lo + block].view(np.int8)
        if signed and (codes == -128).any():
            return None
        flat = codes.reshape(*lead, -1)
        moved = gauge.apply(flat, flat.ndim - 1, signed)
        out[..., lo:lo + block] = moved.reshape(*lead, -1, block).view(np.uint8)
        return out.reshape(data.shape)
    # e2m1: element j in the low nibble of byte j, element j + 16 in the high nibble
    packed = blocks[..., lo:lo + block // 2]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # [..., nb, 32]
    flat = codes.reshape(*lead, -1)
    moved = np.ascontiguousarray(gauge.apply(flat, flat.ndim - 1, False))
    if signed:
        moved[..., gauge.sign < 0] ^= 0x08
    moved = moved.reshape(*lead, -1, block)
    out[..., lo:lo + block // 2] = moved[..., :block // 2] | (moved[..., block // 2:] << 4)
    return out.reshape(data.shape)


def _move_blocks(data: np.ndarray, tname: str, gauge: SignedPerm, signed: bool
                 ) -> tuple[np.ndarray | None, str]:
    """Along the inner axis, exactly where the layout allows it; (None, why) otherwise."""
    if tname in _FLOAT_BITS:
        return _move_rows(data, tname, data.ndim - 1, gauge, signed), ""
    layout = _layout(tname)
    block, nbytes = _block_size(tname)
    bm = _block_map(gauge, block)
    if bm is None:
        return None, f"the gauge moves elements between its {block}-element blocks"
    src, in_order, uniform = bm
    if layout.codes is not None:
        moved = _move_codes(data, tname, gauge, signed, src)
        if moved is not None:
            return moved, ""
    if not in_order:
        return None, f"the gauge reorders elements within its {block}-element blocks"
    if signed and not uniform:
        return None, f"the gauge flips signs of single elements within its {block}-element " \
                     "blocks"
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, -1, nbytes)
    block_sign = gauge.sign.reshape(-1, block)[:, 0]
    out = np.ascontiguousarray(SignedPerm(src, block_sign).apply(blocks, blocks.ndim - 2,
                                                                  False))
    if signed and (block_sign < 0).any():
        _negate_fields(out, layout, np.broadcast_to(block_sign < 0, out.shape[:-1]))
    return out.reshape(data.shape), ""


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.linalg.norm(b.astype(np.float64)))
    diff = float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)))
    return diff / scale if scale > 0 else diff


def move_tensor(name: str, data: np.ndarray, ttype: Any, op: Op, gauge: SignedPerm,
                measure: str = "round_trip") -> tuple[np.ndarray, TensorMove]:
    """One GGUF tensor's data (as gguf-py's reader holds it: packed bytes on the inner axis)
    moved under ``op``: exactly where the layout allows, else requantised (or refused).
    ``measure``: what a requantised tensor's record holds: "round_trip" (the error and the
    plain round trip's), "error", or "none" (a fingerprint needs only the bytes)."""
    from gguf import quants

    tname = _type_name(ttype)
    g = gauge.tiled(op.blocks)
    record = TensorMove(name, tname, "exact")
    inner = data.ndim - 1
    for axis in op.axes:
        axis = axis % data.ndim
        if axis != inner:
            data = _move_rows(data, tname, axis, g, op.signed)
            continue
        moved, why = _move_blocks(data, tname, g, op.signed)
        if moved is not None:
            data = moved
            continue
        if tname not in quantisable():
            raise GaugefixError(
                f"{name} is {tname}, whose blocks run along the residual axis: it cannot be "
                f"moved exactly ({why}), and gguf-py has no {tname} quantiser to requantise "
                f"it with (it quantises {', '.join(quantisable())})")
        t = quants.GGMLQuantizationType[tname]
        values = quants.dequantize(data, t)
        target = g.apply(values, values.ndim - 1, op.signed)
        data = quants.quantize(target, t)
        record = TensorMove(name, tname, "requantised")
        if measure != "none":
            record.error = _relative(quants.dequantize(data, t), target)
        if measure == "round_trip":
            record.round_trip = _relative(quants.dequantize(quants.quantize(values, t), t),
                                          values)
    return np.ascontiguousarray(data), record


# ---------------------------------------------------------------------------- the file
def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (its magic), whatever its name; a FIFO or a device
    is never opened to look (a named pipe would block)."""
    import stat

    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` file of a folder that holds
    no config.json (several: an error naming them)."""
    if path.is_file():
        return path if is_gguf(path) else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix == SUFFIX and p.is_file())
    if len(found) > 1:
        raise GaugefixError(f"{path} holds {len(found)} GGUF files "
                            f"({', '.join(p.name for p in found[:4])}); name one")
    return found[0] if found else None


@cache
def _reader_class() -> type[gguf.GGUFReader]:
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf-py's reader over a plain ndarray view of its ``np.memmap``: the reader slices
        its mapping once or more per metadata value (three times per vocabulary entry) and
        dequantisation slices tensors per 16 rows; on an ``np.memmap`` every slice runs
        memmap's Python hooks. The same bytes, the same mapping (the view keeps it open):
        2.8x faster to open SmolLM2's file, 1.6x to dequantise it."""

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = np.asarray(value)

    return Reader


def open_reader(path: str | Path, what: str = "GGUF file") -> gguf.GGUFReader:
    """gguf-py's reader of ``path``, faster (see :func:`_reader_class`), once the file's
    structure holds (:func:`gaugefix.quant.gguf_check.check_structure`: one error line
    otherwise); gguf-py's own errors as it raises them."""
    from .gguf_check import check_structure

    check_structure(path, what=what)
    return _reader_class()(path)


@contextlib.contextmanager
def _reader_reused(reader: gguf.GGUFReader) -> Iterator[None]:
    """Within: transformers' GGUF code (which imports these from ``gguf`` when called) gets
    our reader instead of parsing the file again for the config and again for the weights
    (gguf-py's reader parses a vocabulary entry by entry: 1 s for 49k tokens, 5 s for 262k,
    over a plain array), and each architecture's name table built once instead of once per
    submodule (transformers' weight map recurses through ~400 modules, ~9 s). Same objects,
    read only: what transformers computes is unchanged."""
    import gguf as gguf_module

    saved = gguf_module.GGUFReader, gguf_module.get_tensor_name_map
    gguf_module.GGUFReader = lambda *_a, **_k: reader  # type: ignore[assignment,misc]
    gguf_module.get_tensor_name_map = cache(saved[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf_module.GGUFReader, gguf_module.get_tensor_name_map = saved  # type: ignore[misc]


# What parsing a GGUF file gives (gguf-py's reader, transformers' config, the name map), for
# the last few files opened: gguf-py parses every metadata field in Python (a 49k-token
# vocabulary: 1 s), and a file is often opened several times in one process (identify, then
# canonicalize; a job per command of a script). Keyed by the file itself (device, inode,
# size: a cached reader maps the file, so its inode cannot be freed and reused while cached)
# and used again only while the bytes it parsed, everything before the tensor data, are
# unchanged (a hash of them, read again from the file); tensor data are read through the
# reader's shared mapping, which shows the file as it is. Read only, shared by every GgufFile
# of that file.
_PARSED: collections.OrderedDict[tuple[int, ...], dict[str, Any]] = collections.OrderedDict()
_PARSED_FILES = 4


def _head_digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _parsed(path: Path) -> dict[str, Any]:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size)
    entry = _PARSED.get(key)
    if entry is not None and "reader" in entry:
        with open(path, "rb") as f:
            head = f.read(int(entry["reader"].data_offset))
        if _head_digest(head) != entry["digest"]:
            entry = None
    if entry is None:
        entry = _PARSED[key] = {}
        while len(_PARSED) > _PARSED_FILES:
            _PARSED.popitem(last=False)
    _PARSED.move_to_end(key)
    return entry


@dataclass
class GgufFile:
    """One GGUF model file: its config (transformers' reading), its tensors under the family
    table's names, dequantised on demand."""

    path: Path
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)  # see _PARSED

    @classmethod
    def open(cls, path: Path) -> GgufFile:
        from ..io import note_input

        note_input(path)
        out = cls(path, _shared=_parsed(path))
        reader = out.reader  # parse now: a bad file is refused when opened
        split = reader.fields.get("split.count")
        if split is not None and int(split.contents()) > 1:
            no = reader.fields.get("split.no")
            part = f"part {int(no.contents()) + 1} of {int(split.contents())}" if no else \
                f"one of {int(split.contents())} parts"
            raise GaugefixError(f"{path} is {part} of a split GGUF model (split.count = "
                                f"{int(split.contents())}); gaugefix reads a whole model: join "
                                "the parts into one file first (llama-gguf-split --merge FIRST "
                                "OUT)")
        return out

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        """What parsing gave ``name``, made once per file (see :data:`_PARSED`)."""
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]

    @property
    def reader(self) -> gguf.GGUFReader:
        return self._once("reader", self._read)

    def _read(self) -> gguf.GGUFReader:
        try:
            reader = open_reader(self.path)
        except GaugefixError:
            raise
        except (ValueError, OSError, KeyError, IndexError, AssertionError) as exc:
            first = str(exc).strip().split("\n", 1)[0]
            raise GaugefixError(f"{self.path}: not a readable GGUF file ({first})") from None
        self._shared["digest"] = _head_digest(reader.data[:reader.data_offset])
        return reader

    @property
    def config(self) -> dict[str, Any]:
        """transformers' config for the file (as ``from_pretrained(gguf_file=...)`` builds
        it; a copy)."""
        return dict(self._once("config", self._config))

    def _config(self) -> dict[str, Any]:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            with _reader_reused(self.reader):
                cfg = dict(load_gguf_checkpoint(str(self.path), return_tensors=False)["config"])
        except (ValueError, KeyError, NotImplementedError) as exc:
            first = str(exc).strip().split("\n", 1)[0]
            arch = self.architecture
            raise GaugefixError(f"{self.path}: transformers cannot read GGUF architecture "
                                f"{arch!r} ({first})") from None
        return cfg

    @property
    def architecture(self) -> str:
        f = self.reader.fields.get("general.architecture")
        return str(f.contents()) if f is not None else "?"

    @cached_property
    def _processor(self) -> Any:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        return TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.config)

    @property
    def names(self) -> dict[str, str]:
        return self._once("names", self._names)

    def _names(self) -> dict[str, str]:
        """GGUF tensor name -> Hugging Face key, through gguf-py's own name table
        (``get_tensor_name_map``: every name a converter writes for the architecture) over the
        keys of the module transformers builds for the config (on the meta device: no
        memory). A tensor of the file with no key is refused: it could not be moved."""
        import gguf
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.architecture),
                    None)
        if arch is None:
            raise GaugefixError(f"{self.path}: gguf-py knows no architecture "
                                f"{self.architecture!r}")
        n_layers = int(self.config.get("num_hidden_layers") or 0)
        table = gguf.get_tensor_name_map(arch, n_layers)
        try:
            with torch.device("meta"):
                module = AutoModelForCausalLM.from_config(AutoConfig.for_model(**self.config))
        except Exception as exc:  # transformers' checks raise any kind
            # the last line says what (a validator's error wraps the ValueError below it)
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            said = lines[-1] if lines else type(exc).__name__
            if len(lines) <= 1 and ":" not in said:
                said = f"{type(exc).__name__}: {said}"
            raise GaugefixError(f"{self.path}: its metadata does not describe a model "
                                f"transformers can build for {self.architecture} ({said})"
                                ) from None
        params = module.state_dict(keep_vars=True)
        mapping: dict[str, str] = {}
        for key in params:
            name, _, suffix = self._processor.preprocess_name(key).rpartition(".")
            parts = name.split(".")
            for i in range(len(parts)):  # the name, then without its leading modules
                found = table.get_name(".".join(parts[i:]))
                if found is not None:
                    mapping.setdefault(f"{found}.{suffix}", key)
                    break
        out = {}
        unmapped = []
        for t in self.reader.tensors:
            if t.name in mapping:
                out[t.name] = mapping[t.name]
            else:
                unmapped.append(t.name)
        if unmapped:
            raise GaugefixError(f"{self.path}: {len(unmapped)} tensors have no Hugging Face "
                                f"name under gguf-py's name table for {self.architecture} "
                                f"({', '.join(unmapped[:4])}{' ...' if len(unmapped) > 4 else ''})")
        self._check_against(params, out, mapping)
        return out

    def _check_against(self, params: Mapping[str, Any], names: Mapping[str, str],
                       mapping: Mapping[str, str]) -> None:
        """The file's tensors against the module its metadata describes, every contradiction
        in one error (as a checkpoint's config is checked against its shards): a tensor the
        module needs and the file lacks (weights tied to a present one excepted), a shape
        other than the module's, a type gaugefix cannot read as weights."""
        held = {key: t for t in self.reader.tensors if (key := names.get(t.name))}
        gguf_name = {key: name for name, key in mapping.items()}
        groups: dict[int, list[str]] = {}
        for key, p in params.items():
            groups.setdefault(id(p), []).append(key)
        missing = sorted(gguf_name.get(keys[0], keys[0]) for keys in groups.values()
                         if not any(k in held for k in keys))
        problems = []
        if missing:
            many = len(missing) > 1
            problems.append(f"{len(missing)} tensor{'s' if many else ''} the metadata's model "
                            f"needs {'are' if many else 'is'} missing ("
                            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        for key, t in held.items():
            want = tuple(params[key].shape)
            got = tuple(int(n) for n in reversed(t.shape))
            if want != got:
                problems.append(f"{t.name} has shape {list(got)} where the metadata's model has "
                                f"{list(want)}")
            if t.tensor_type.name not in LAYOUTS:
                problems.append(f"{t.name} is {t.tensor_type.name}, not a float or quantised "
                                f"type gaugefix reads as weights ({', '.join(LAYOUTS)})")
            if len(problems) >= 6:
                break
        if problems:
            raise GaugefixError(f"{self.path}: its metadata contradicts its tensors: "
                                + "; ".join(problems))

    @cached_property
    def tensors(self) -> dict[str, Any]:
        """Hugging Face key -> gguf-py's ReaderTensor."""
        names = self.names
        return {names[t.name]: t for t in self.reader.tensors}

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face key -> logical shape (GGUF lists dimensions innermost first)."""
        return {k: tuple(int(n) for n in reversed(t.shape)) for k, t in self.tensors.items()}

    @cached_property
    def types(self) -> dict[str, str]:
        return {k: t.tensor_type.name for k, t in self.tensors.items()}

    @property
    def quantised(self) -> dict[str, int]:
        """Count of tensors per quantised GGML type."""
        out: dict[str, int] = {}
        for t in self.types.values():
            if t not in _FLOAT_BITS:
                out[t] = out.get(t, 0) + 1
        return out

    def tensor(self, key: str) -> torch.Tensor:
        """``key`` dequantised (float32) as transformers loads it."""
        import torch
        from gguf import dequantize

        if self._cache.get("key") == key:
            return self._cache["value"]
        t = self.tensors[key]
        values = dequantize(t.data, t.tensor_type)
        values = self._processor.process(weights=values, name=t.name).weights
        out = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(
            self.shapes[key])
        self._cache.update(key=key, value=out)
        return out

    def load(self, dtype: torch.dtype, **options: Any) -> torch.nn.Module:
        """The module, through transformers' GGUF loading (dequantised)."""
        from transformers import GgufConfig
        from transformers.utils import logging

        from ..loading import load_causal_lm

        bars = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # gaugefix's own output says what is going on
        try:
            with _reader_reused(self.reader):
                return load_causal_lm(self.path.parent, dtype, gguf_file=self.path.name,
                                      quantization_config=GgufConfig(dequantize=True),
                                      **options)
        finally:
            if bars:
                logging.enable_progress_bar()

    # ------------------------------------------------------------------ moving it
    def moves(self, plan: Mapping[str, Op], gauge: SignedPerm, measure: str = "round_trip"
              ) -> Iterator[tuple[Any, np.ndarray, TensorMove]]:
        """(reader tensor, moved data, record) for every tensor in file order (``measure``:
        see :func:`move_tensor`)."""
        for key, t in self.tensors.items():
            op = plan[key]
            if op.residual_axis is None:
                yield t, t.data, TensorMove(t.name, t.tensor_type.name, "untouched")
                continue
            data, record = move_tensor(t.name, np.asarray(t.data), t.tensor_type, op, gauge,
                                       measure)
            yield t, data, record

    def write(self, out: Path, plan: Mapping[str, Op], gauge: SignedPerm,
              record: Mapping[str, Any]) -> list[TensorMove]:
        """This file in the chart ``gauge`` leads to, at ``out``: every metadata field copied
        (as gguf-py's gguf_new_metadata copies them), ``gaugefix.record`` added (what moved
        exactly and what was requantised, with the errors), tensors moved and written one at
        a time (memory: one tensor). The record is known once the tensors are written: its
        field is reserved in the header and filled in place at the end."""
        import gguf

        reader = self.reader
        # a canonical chart's record holds nothing of the chart it came from: the round trip
        # is the input's (re-gauged copies differ there), the error the output's
        keep = "chart" not in record
        measure = "round_trip" if keep else "error"
        n_moved = sum(plan[k].residual_axis is not None for k in self.tensors)
        reserved = 512 + 256 * n_moved + len(json.dumps(dict(record)))
        mark = _RECORD_MARK + " " * (reserved - len(_RECORD_MARK))
        writer = gguf.GGUFWriter(out, self.architecture, endianess=reader.endianess)
        with contextlib.closing(writer):
            copy_fields(reader, writer)
            writer.add_string(RECORD_KEY, mark)
            for t in reader.tensors:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            moved = []
            for _, data, rec in self.moves(plan, gauge, measure):
                writer.write_tensor_data(data)
                moved.append(rec)
        doc = dict(record)
        doc["exact"] = sum(r.how != "requantised" for r in moved)
        doc["requantised"] = [r.to_dict(keep) for r in moved if r.how == "requantised"]
        text = json.dumps(doc)
        if len(text) > reserved:  # cannot happen with the reservation above; say so if it did
            raise GaugefixError("internal error: the gauge record outgrew its reserved field")
        _fill_mark(out, mark.encode(), text.ljust(reserved).encode())
        return moved


RECORD_KEY = "gaugefix.record"


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every metadata field of ``reader`` into ``writer``, as gguf-py's gguf_new_metadata
    copies them: all but the ones the writer writes itself (the architecture, ``GGUF.*``)
    and an earlier gauge record (the caller writes its own)."""
    import gguf

    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") \
                or f.name == RECORD_KEY:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
_RECORD_MARK = "gaugefix-record-reserved"


def _fill_mark(path: Path, mark: bytes, text: bytes) -> None:
    """Overwrite the reserved record field (in the header, before the tensor data)."""
    with open(path, "r+b") as f:
        head = f.read(1 << 20)
        while True:
            at = head.find(mark)
            if at >= 0:
                break
            more = f.read(1 << 24)
            if not more:
                raise GaugefixError(f"internal error: {path}: reserved record field not found")
            head += more
        f.seek(at)
        f.write(text)


def read_record(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    """The ``gaugefix.record`` of a file gaugefix wrote (None for others)."""
    f = reader.fields.get(RECORD_KEY)
    if f is None:
        return None
    try:
        doc = json.loads(str(f.contents()))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def check_moved(a: GgufFile, b: GgufFile, plan: Mapping[str, Op], gauge: SignedPerm
                ) -> list[TensorMove]:
    """Tensor by tensor, what B is of A moved by ``gauge``: ``exact`` (B dequantises to A's
    dequantised values moved, bit for bit), ``requantised`` (B is, byte for byte, gguf-py's
    reference quantiser applied to them: ``error`` is what that costs), or ``differs``."""
    from gguf import quants

    out = []
    for key, ta in a.tensors.items():
        tb = b.tensors.get(key)
        tname = ta.tensor_type.name
        if tb is None or tb.tensor_type != ta.tensor_type or tb.data.shape != ta.data.shape:
            out.append(TensorMove(ta.name, tname, "differs"))
            continue
        values = quants.dequantize(np.asarray(ta.data), ta.tensor_type)
        target = plan[key](gauge, values)
        got = quants.dequantize(np.asarray(tb.data), tb.tensor_type)
        if np.array_equal(got, target):
            out.append(TensorMove(ta.name, tname, "exact"))
        elif tname in quantisable() and np.array_equal(
                quants.quantize(target, ta.tensor_type), np.asarray(tb.data)):
            out.append(TensorMove(ta.name, tname, "requantised", _relative(got, target),
                                  _relative(quants.dequantize(
                                      quants.quantize(values, ta.tensor_type),
                                      ta.tensor_type), values)))
        else:
            out.append(TensorMove(ta.name, tname, "differs", _relative(got, target)))
    return out


def rounding_noise(values: np.ndarray, tname: str) -> float:
    """The relative error rounding ``values`` to ``tname`` is expected to cost: a uniform
    grid of ``2**bits`` levels over each block's range (blocks of 32 along the last axis; 16
    for the K-quants whose sub-blocks are 16), error ``step/√12`` per element."""
    noise, norm = rounding_noise_parts(values, tname)
    return math.sqrt(noise / norm) if norm > 0 else 0.0


def rounding_noise_parts(values: np.ndarray, tname: str) -> tuple[float, float]:
    """:func:`rounding_noise`'s two sums (expected squared error, squared norm), which add
    over blocks of rows: a whole tensor need not be in float64 at once."""
    layout = LAYOUTS.get(tname)
    if layout is None or tname in _FLOAT_BITS:
        return 0.0, 0.0
    block = 16 if tname in ("Q2_K", "Q3_K", "Q6_K") else 32
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[-1]
    if n % block:
        block = n
    x = x.reshape(-1, n // block, block)
    step = (x.max(-1) - x.min(-1)) / (2 ** layout.bits - 1)
    return float((step ** 2 / 12 * block).sum()), float((x * x).sum())


def capability_markdown() -> str:
    """The GGUF rows of the README's table, from :data:`LAYOUTS` and gguf-py's quantisers:
    format × move → exact / requantised / refused."""
    can = set(quantisable())
    rows = ["| GGUF type | reader permutation | reader sign | writer permutation | writer sign "
            "| embedding |", "|---|---|---|---|---|---|"]
    groups: dict[str, list[str]] = {}
    for tname, layout in LAYOUTS.items():
        if tname in _FLOAT_BITS:
            cells = ["exact"] * 5
        else:
            block = _block_size(tname)[0]
            fallback = ("else requantised (gguf-py)" if tname in can else
                        "else refused (gguf-py has no quantiser for it)")
            sign_field = ("element sign bits" if layout.xor else
                          "d" + (", m/dmin" if len(layout.scales) > 1 else "") + " negated")
            if layout.codes:
                perm = f"exact if every {block}-block maps onto one block; {fallback}"
                rsign = "exact (symmetric codes)"
            else:
                perm = f"exact if whole {block}-blocks move in order; {fallback}"
                rsign = f"exact if whole {block}-blocks flip; {fallback}"
            cells = [perm, rsign, "exact (rows whole)", f"exact ({sign_field})", "as reader"]
        groups.setdefault(" | ".join(cells), []).append(tname)
    for cells, names in groups.items():
        rows.append(f"| {', '.join(names)} | {cells} |")
    return "\n".join(rows)
