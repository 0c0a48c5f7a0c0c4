"""Safetensors shards rewritten tensor by tensor: disk speed, bounded memory, hashed in passing.

A gauge changes no tensor's name, dtype or shape, so a shard keeps its header, and every
tensor its place in the file. The rewrite reads the input once, in file order: an untouched
tensor is copied as bytes; a moved tensor goes through the single primitive
(:meth:`SignedPerm.apply`, via :class:`~gaugefix.arch.Op`) in blocks of whole slices along
the axes before its residual axis (or whole, when the residual axis is the first), and is
written where it was. Every byte read and written can be fed to a running hash of each file,
so a checkpoint's identity (sha256 of its weight files) costs no second read; the hashing
runs on another thread, overlapping the I/O.

Peak memory: a few blocks of :data:`BLOCK_BYTES`, and two copies of the largest tensor whose
residual axis is its first (a writer's output rows are gathered from anywhere in the input).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import GaugefixError
from .group import SignedPerm

BLOCK_BYTES = 32 << 20

# safetensors dtype names -> torch dtypes (those this torch build has)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Layout:
    header: bytes  # the 8-byte length and the JSON header, as in the file
    metadata: dict[str, str]
    entries: tuple[Entry, ...]  # in file order
    size: int


def read_layout(path: Path, what: str = "weight shard") -> Layout:
    """Header and tensor placement of a safetensors file (validated by safetensors first)."""
    from .io import open_safetensors

    with open_safetensors(path, what):
        pass  # safetensors itself checks the header, offsets and coverage of the file
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    doc = json.loads(raw)
    base = 8 + n
    entries = sorted((Entry(k, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                            base + v["data_offsets"][1])
                      for k, v in doc.items() if k != "__metadata__"), key=lambda e: e.begin)
    return Layout(struct.pack("<Q", n) + raw, dict(doc.get("__metadata__") or {}),
                  tuple(entries), path.stat().st_size)


def with_metadata(layout: Layout, metadata: Mapping[str, str]) -> bytes:
    """The header of ``layout`` with other metadata (same tensors at the same data offsets),
    padded with spaces to 8 bytes as safetensors writes it."""
    doc = json.loads(layout.header[8:])
    doc.pop("__metadata__", None)
    body = json.dumps({"__metadata__": dict(metadata), **doc}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


class Hashes:
    """sha256 of the input and of the output stream, updated on a worker thread (hashlib
    releases the GIL), in submission order; at most ``depth`` blocks in flight."""

    def __init__(self, src: bool, dst: bool, depth: int = 2) -> None:
        self.src = hashlib.sha256() if src else None
        self.dst = hashlib.sha256() if dst else None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if (
            src or dst) else None
        self._pending: list[concurrent.futures.Future[None]] = []
        self._depth = depth

    def feed(self, src: Any | None, dst: Any | None) -> None:
        jobs = [(h, b) for h, b in ((self.src, src), (self.dst, dst))
                if h is not None and b is not None]
        if not jobs or self._pool is None:
            return
        self._pending.append(self._pool.submit(_update, jobs))
        while len(self._pending) > self._depth:
            self._pending.pop(0).result()

    def hexdigests(self) -> tuple[str | None, str | None]:
        self.wait()
        return (None if self.src is None else self.src.hexdigest(),
                None if self.dst is None else self.dst.hexdigest())

    def wait(self) -> None:
        for fut in self._pending:
            fut.result()
        self._pending.clear()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


def _update(jobs: list[tuple[Any, Any]]) -> None:
    for h, data in jobs:
        h.update(data)


def _read(f: BinaryIO, offset: int, n: int) -> bytearray:
    buf = bytearray(n)
    f.seek(offset)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise GaugefixError(f"{f.name}: file ends early (at byte {offset + got})")
        got += k
    return buf


def _copy(fi: BinaryIO, fo: BinaryIO, begin: int, end: int, hashes: Hashes) -> None:
    for start in range(begin, end, BLOCK_BYTES):
        buf = _read(fi, start, min(BLOCK_BYTES, end - start))
        fo.write(buf)
        hashes.feed(buf, buf)


def _blocks(e: Entry, axis: int) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """(byte offset, byte length, 3-D shape) of blocks of whole slices before ``axis``."""
    itemsize = torch.empty((), dtype=DTYPES[e.dtype]).element_size()
    outer = math.prod(e.shape[:axis])
    rest = math.prod(e.shape[axis:])
    if axis == 0 or rest * itemsize >= BLOCK_BYTES:
        per = 1 if axis else outer
    else:
        per = max(1, BLOCK_BYTES // (rest * itemsize))
    inner = math.prod(e.shape[axis + 1:])
    for o in range(0, outer, per):
        k = min(per, outer - o)
        yield e.begin + o * rest * itemsize, k * rest * itemsize, (k, e.shape[axis], inner)


MoveFn = Callable[[torch.Tensor, int], torch.Tensor]


def _move(fi: BinaryIO, fo: BinaryIO, e: Entry, axis: int, move: MoveFn,
          hashes: Hashes) -> None:
    """Read, move along ``axis`` block by block, write, hash."""
    if e.dtype not in DTYPES:
        raise GaugefixError(f"{fi.name}: tensor {e.name!r} has dtype {e.dtype}, which this "
                            "torch cannot represent")
    for offset, n, shape3 in _blocks(e, axis):
        buf = _read(fi, offset, n)
        block = torch.frombuffer(buf, dtype=DTYPES[e.dtype]).reshape(shape3)
        out = move(block, 1).contiguous()
        raw = out.view(torch.uint8).numpy() if out.numel() else b""
        fo.write(raw)
        hashes.feed(buf, raw)


def rewrite(src: Path, dst: Path, moves: Mapping[str, tuple[int, MoveFn] | None], *,
            hashes: Hashes | None = None, metadata: Mapping[str, str] | None = None) -> int:
    """Write ``src`` to ``dst`` with each tensor named in ``moves`` moved along its residual
    axis (``(axis, fn)``: ``fn(tensor, axis)`` returns the moved tensor; ``None``: copied as
    bytes). ``metadata`` replaces the header's metadata. Returns the bytes written."""
    layout = read_layout(src)
    hashes = hashes or Hashes(False, False)
    header = layout.header if metadata is None else with_metadata(layout, metadata)
    shift = len(header) - len(layout.header)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(header)
        hashes.feed(layout.header, header)
        pos = len(layout.header)
        for e in layout.entries:
            if e.begin > pos:  # bytes between tensors, kept as they are
                _copy(fi, fo, pos, e.begin, hashes)
            spec = moves.get(e.name)
            if spec is None:
                _copy(fi, fo, e.begin, e.end, hashes)
            else:
                _move(fi, fo, e, spec[0], spec[1], hashes)
            pos = e.end
        if layout.size > pos:
            _copy(fi, fo, pos, layout.size, hashes)
        written = fo.tell()
    if written != layout.size + shift:
        raise GaugefixError(f"internal error: {dst} has {written} bytes, expected "
                            f"{layout.size + shift}")
    return written


def gauge_moves(plan: Mapping[str, Any], gauge: SignedPerm, layout: Layout
                ) -> dict[str, tuple[int, MoveFn] | None]:
    """Per tensor of ``layout``: its residual axis and the primitive that moves it (through
    the plan's :class:`~gaugefix.arch.Op`, on a 3-D block whose axis 1 is the residual one),
    or None for untouched tensors."""
    out: dict[str, tuple[int, MoveFn] | None] = {}
    for e in layout.entries:
        op = plan[e.name]
        axis = op.residual_axis
        if axis is None:
            out[e.name] = None
            continue
        axis = axis if axis >= 0 else axis + len(e.shape)
        signed = op.signed
        out[e.name] = (axis, lambda t, ax, signed=signed: gauge.apply(t, ax, signed))
    return out


class ElementReader:
    """Contiguous element ranges of any tensor of a checkpoint, read on demand: safetensors
    shards by offset (no more than the range in memory), torch files whole (a legacy
    format, loaded once per tensor asked for)."""

    def __init__(self, shards: list[Path]) -> None:
        self._where: dict[str, tuple[Path, Entry]] = {}
        self._legacy: list[Path] = []
        for shard in shards:
            if shard.suffix == ".safetensors":
                for e in read_layout(shard).entries:
                    self._where[e.name] = (shard, e)
            else:
                self._legacy.append(shard)
        self._files: dict[Path, BinaryIO] = {}
        self._loaded: dict[str, torch.Tensor] = {}

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        if name in self._where:
            path, e = self._where[name]
            if path not in self._files:
                self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
            item = torch.empty((), dtype=DTYPES[e.dtype]).element_size()
            buf = _read(self._files[path], e.begin + start * item, count * item)
            return torch.frombuffer(buf, dtype=DTYPES[e.dtype]) if count else torch.empty(
                0, dtype=DTYPES[e.dtype])
        if name not in self._loaded:
            from .checkpoint import load_shard

            self._loaded.clear()  # one legacy tensor at a time
            for shard in self._legacy:
                sd = load_shard(shard)
                if name in sd:
                    self._loaded[name] = sd[name].reshape(-1)
                    break
            else:
                raise GaugefixError(f"no tensor {name!r} in {[p.name for p in self._legacy]}")
        return self._loaded[name][start:start + count]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def element_blocks(e: Entry) -> Iterator[tuple[int, int]]:
    """(first element, count) of consecutive blocks of at most BLOCK_BYTES."""
    item = torch.empty((), dtype=DTYPES[e.dtype]).element_size()
    n = math.prod(e.shape)
    per = max(1, BLOCK_BYTES // item)
    for start in range(0, n, per):
        yield start, min(per, n - start)
