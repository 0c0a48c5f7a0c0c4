"""The structure of a GGUF file checked against the file itself, before any reader trusts it.

gguf-py's reader believes what a header says: a metadata array that declares 2^50 entries is
read as far as the bytes go (and then some: >3 GiB of parts), a tensor count one too low moves
the start of the data so that every tensor is read from the wrong bytes, a tensor whose type
is relabelled (Q4_0 as Q8_0) reads its neighbour's bytes, an offset of 2^64 − 1 wraps around.
:func:`check_structure` walks the header once, without building anything, and holds every
declared count, length, type, shape, size and offset against the bytes left and against each
other, as llama.cpp's own loader (``gguf.cpp``) holds them:

- a regular file (a FIFO or a device would block or never end), the magic, a version gguf-py
  reads (2 or 3), either byte order;
- every metadata key and string within the file, every array's declared length within the
  bytes left (at its elements' least size), a known value type, ``general.alignment`` a
  non-zero power of two stored as UINT32;
- every tensor: a name seen once, 1–4 dimensions, each ≥ 1, a GGML type gguf-py knows whose
  block divides the innermost dimension, its byte size without overflow;
- the tensor data as llama.cpp lays it out and requires it: each tensor at the offset where
  the one before it ends (rounded up to the alignment), nothing overlapping, nothing beyond
  the end of the file, and no bytes after the last tensor that no tensor claims (what a count
  one too low leaves).

Every problem is reported in one error (the first few of each kind), naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from ..errors import GaugefixError

MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
VERSIONS = (2, 3)
# GGUF value types: struct code of the fixed-size ones; 8 = string, 9 = array
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
          12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_PROBLEMS = 6


class _Walk:
    """A bounded cursor over the mapped header."""

    def __init__(self, buf: mmap.mmap | bytes, order: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.order = order

    def left(self) -> int:
        return self.size - self.pos

    def take(self, code: str, what: str) -> int | float | bool:
        n = struct.calcsize(code)
        if self.pos + n > self.size:
            raise _Short(what)
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = int(self.take("Q", f"{what}'s length"))
        if n > self.left():
            raise _Short(f"{what} (declares {n} bytes, {self.left()} left in the file)")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def skip_strings(self, count: int, what: str) -> None:
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct(
            self.order + "Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise _Short(f"{what}[{i}]'s length")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                raise _Short(f"{what}[{i}] (runs past the end of the file)")
        self.pos = pos


class _Short(Exception):
    """A declared length that the bytes left cannot hold."""


def _value(w: _Walk, vtype: int, what: str, depth: int = 0) -> object:
    """Step over one metadata value (its scalar returned, for the alignment)."""
    if vtype in _FIXED:
        return w.take(_FIXED[vtype], what)
    if vtype == _STRING:
        w.string(what)
        return None
    if vtype != _ARRAY or depth > 2:
        raise _Bad(f"{what} has value type {vtype}, which GGUF does not define")
    itype = int(w.take("I", f"{what}'s element type"))
    count = int(w.take("Q", f"{what}'s length"))
    least = struct.calcsize(_FIXED[itype]) if itype in _FIXED else 8 \
        if itype in (_STRING, _ARRAY) else None
    if least is None:
        raise _Bad(f"{what} is an array of value type {itype}, which GGUF does not define")
    if count * least > w.left():
        raise _Bad(f"{what} declares {count} entries, more than the {w.left()} bytes left in "
                   "the file can hold")
    if itype in _FIXED:
        w.pos += count * least
    elif itype == _STRING:
        w.skip_strings(count, what)
    else:
        for i in range(count):
            _value(w, _ARRAY, f"{what}[{i}]", depth + 1)
    return None


class _Bad(Exception):
    """A value that breaks a rule of the format."""


def check_structure(path: str | Path, *, what: str = "GGUF file") -> None:
    """Refuse ``path`` unless its structure holds (see the module docstring); one error
    naming the file and each broken rule."""
    from ..io import check_regular

    path = check_regular(path, what)  # a FIFO or a device: refused from its stat
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GaugefixError(f"{path}: not a GGUF file ({size} bytes, shorter than a "
                                    "GGUF header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                problems = _problems(buf)
    except OSError as exc:
        raise GaugefixError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if problems:
        more = f" (and {len(problems) - _MAX_PROBLEMS} more)" if len(
            problems) > _MAX_PROBLEMS else ""
        raise GaugefixError(f"{path}: not a well-formed GGUF file: "
                            + "; ".join(problems[:_MAX_PROBLEMS]) + more)


def _problems(buf: mmap.mmap) -> list[str]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(buf[:4]) != b"GGUF":
        return ["its first bytes are not the GGUF magic"]
    version = struct.unpack_from("<I", buf, 4)[0]
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian host (gguf-py reads those too)
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in VERSIONS:
        return [f"GGUF version {version} (gguf-py reads versions {', '.join(map(str, VERSIONS))})"]
    w = _Walk(buf, order)
    w.pos = 8
    n_tensors = int(w.take("Q", "tensor count"))
    n_kv = int(w.take("Q", "metadata count"))
    # a metadata entry takes at least 13 bytes, a tensor entry at least 28
    if n_kv * 13 > w.left():
        return [f"its header declares {n_kv} metadata entries, more than the {w.left()} bytes "
                "left in the file can hold"]
    if n_tensors * 28 > w.left():
        return [f"its header declares {n_tensors} tensors, more than the {w.left()} bytes left "
                "in the file can hold"]
    problems: list[str] = []
    alignment = DEFAULT_ALIGNMENT
    try:
        for i in range(n_kv):
            key = w.string(f"metadata entry {i}'s key").decode("utf-8", "replace")
            vtype = int(w.take("I", f"{key}'s value type"))
            value = _value(w, vtype, repr(key))
            if key == "general.alignment":
                if vtype != 4 or not isinstance(value, int) or value <= 0 \
                        or value & (value - 1):
                    problems.append(f"general.alignment is {value!r} (type {vtype}); it must be "
                                    "a non-zero power of two stored as UINT32")
                else:
                    alignment = value
        tensors: list[tuple[str, int, int]] = []  # name, offset, byte size
        seen: set[str] = set()
        for i in range(n_tensors):
            name = w.string(f"tensor {i}'s name").decode("utf-8", "replace")
            n_dims = int(w.take("I", f"tensor {name!r}'s dimension count"))
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Bad(f"tensor {name!r} declares {n_dims} dimensions (GGUF allows 1 to "
                           f"{MAX_DIMS})")
            dims = [int(w.take("Q", f"tensor {name!r}'s shape")) for _ in range(n_dims)]
            ttype = int(w.take("I", f"tensor {name!r}'s type"))
            offset = int(w.take("Q", f"tensor {name!r}'s offset"))
            if name in seen:
                problems.append(f"tensor {name!r} is listed twice")
            seen.add(name)
            try:
                gtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[gtype]
            except (ValueError, KeyError):
                problems.append(f"tensor {name!r} has GGML type {ttype}, which gguf-py does not "
                                "know")
                continue
            shape = "×".join(map(str, dims))
            if min(dims) < 1:
                problems.append(f"tensor {name!r} has shape {shape}: every dimension must be "
                                "at least 1")
                continue
            elements = 1
            for n in dims:
                elements *= n
            if elements >= 1 << 62:
                problems.append(f"tensor {name!r} has shape {shape}, more elements than a file "
                                "can hold")
                continue
            if dims[0] % block:
                problems.append(f"tensor {name!r} is {gtype.name} of shape {shape}: its "
                                f"innermost dimension must be a multiple of the type's "
                                f"{block}-element block")
                continue
            tensors.append((name, offset, elements // block * type_size))
    except _Short as exc:
        return [*problems, f"{exc} runs past the end of the file"]
    except _Bad as exc:
        return [*problems, str(exc)]
    if problems:
        return problems
    start = -(-w.pos // alignment) * alignment
    data = len(buf) - start
    expected = 0
    before = ""
    for name, offset, nbytes in tensors:
        if offset != expected:
            problems.append(f"tensor {name!r} is at data offset {offset}, where GGUF's layout "
                            f"(tensors in order, each aligned to {alignment} bytes) puts it at "
                            f"{expected}{before}")
            break
        before = f", after {name!r}'s {nbytes} bytes (is its type or shape wrong?)"
        if offset + nbytes > data:
            problems.append(f"tensor {name!r} needs bytes {offset}..{offset + nbytes} of the "
                            f"data, which end at {max(data, 0)} (the file is truncated, or its "
                            "size or type is wrong)")
            break
        expected = -(-(offset + nbytes) // alignment) * alignment
    else:
        end = tensors[-1][1] + tensors[-1][2] if tensors else 0
        if data - end >= alignment:
            problems.append(f"{data - end} bytes after its last tensor belong to no tensor "
                            "(a tensor count or a tensor's size that is wrong)")
    return problems
