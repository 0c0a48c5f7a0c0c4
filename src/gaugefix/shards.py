"""Safetensors shards rewritten tensor by tensor: disk speed, bounded memory, hashed in passing.

A gauge changes no tensor's name, dtype or shape, so a shard keeps its header, and every
tensor its place in the file. The rewrite reads the input once, in file order: an untouched
tensor is written as the bytes it is; a moved tensor goes through the single primitive
(:meth:`SignedPerm.apply`, on numpy views of its bits: no torch needed) in blocks of at most
:data:`BLOCK_BYTES` of output (whole slices before its residual axis, or a range of the
residual axis gathered from the whole slice), and is written where it was. Every byte read
and written can be fed to a running hash of each file, so a checkpoint's identity (sha256 of
its weight files) costs no second read; the hashing runs on other threads, overlapping the
I/O. Blocks are small (4 MiB) so that many are in flight on few threads and each stays in the
cache while it is hashed.

Both files are mapped, not read or written: the gather reads the input's page cache and
writes into the output's directly (a ``write`` from a buffer cost a third more time, all of
it in the kernel's copy), untouched bytes are one memcpy. The output's blocks are reserved
before (a write through a mapping to a disk with no room would kill the process). Pages
already hashed are unmapped as the rewrite goes (they stay in the page cache), so the
resident set does not grow with the file.

Peak memory: a few blocks of :data:`BLOCK_BYTES`, and one copy of the largest tensor with
several residual axes (moved whole, in torch).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .errors import GaugefixError
from .group import SignedPerm

if TYPE_CHECKING:
    import torch

BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class StDtype:
    """A safetensors dtype: the numpy dtype of its values (of its bits, for a float, whose
    sign is the top bit) and the name of its torch dtype."""

    numpy: type[np.generic]
    is_float: bool
    torch: str


ST_DTYPES: dict[str, StDtype] = {
    "F64": StDtype(np.int64, True, "float64"), "F32": StDtype(np.int32, True, "float32"),
    "F16": StDtype(np.int16, True, "float16"), "BF16": StDtype(np.int16, True, "bfloat16"),
    "F8_E4M3": StDtype(np.int8, True, "float8_e4m3fn"),
    "F8_E5M2": StDtype(np.int8, True, "float8_e5m2"),
    "I64": StDtype(np.int64, False, "int64"), "I32": StDtype(np.int32, False, "int32"),
    "I16": StDtype(np.int16, False, "int16"), "I8": StDtype(np.int8, False, "int8"),
    "U64": StDtype(np.uint64, False, "uint64"), "U32": StDtype(np.uint32, False, "uint32"),
    "U16": StDtype(np.uint16, False, "uint16"), "U8": StDtype(np.uint8, False, "uint8"),
    "BOOL": StDtype(np.bool_, False, "bool"),
}


def torch_dtype(name: str, where: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype name (an error naming it if this torch has
    none)."""
    import torch

    attr = ST_DTYPES[name].torch if name in ST_DTYPES else None
    if attr is None or not hasattr(torch, attr):
        raise GaugefixError(f"{where}: dtype {name}, which this torch cannot represent")
    return getattr(torch, attr)


def itemsize(name: str) -> int:
    if name not in ST_DTYPES:
        raise GaugefixError(f"unknown safetensors dtype {name}")
    return np.dtype(ST_DTYPES[name].numpy).itemsize


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

    with open_safetensors(path, what, framework="numpy"):
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
    """sha256 of the input and of the output stream, each on its own worker thread (hashlib
    releases the GIL, so both run beside the I/O), in submission order."""

    def __init__(self, src: bool, dst: bool) -> None:
        self.src = hashlib.sha256() if src else None
        self.dst = hashlib.sha256() if dst else None
        self._pools = [concurrent.futures.ThreadPoolExecutor(max_workers=1)
                       for h in (self.src, self.dst) if h is not None]

    def feed(self, src: Any | None, dst: Any | None) -> list[concurrent.futures.Future[Any]]:
        """Queue bytes for each stream; the returned futures say when they were consumed."""
        jobs = [(h, b) for h, b in ((self.src, src), (self.dst, dst)) if h is not None]
        return [pool.submit(h.update, b) for pool, (h, b) in zip(self._pools, jobs,
                                                                  strict=True)]

    def hexdigests(self) -> tuple[str | None, str | None]:
        self.close()
        return (None if self.src is None else self.src.hexdigest(),
                None if self.dst is None else self.dst.hexdigest())

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)


def _readinto(f: BinaryIO, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``offset`` (positional reads where the system has them, so
    concurrent readers of one file do not share a file position)."""
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            k = os.preadv(f.fileno(), [view[got:]], offset + got)
        else:  # pragma: no cover - Windows
            f.seek(offset + got)
            k = f.readinto(view[got:])
        if not k:
            raise GaugefixError(f"{f.name}: file ends early (at byte {offset + got})")
        got += k


def _read(f: BinaryIO, offset: int, n: int) -> bytearray:
    buf = bytearray(n)
    _readinto(f, offset, memoryview(buf))
    return buf


@dataclass(frozen=True)
class Move:
    """How one tensor of a rewrite moves: along its residual ``axis`` by ``gauge`` through the
    primitive, in blocks; or, with several residual axes (a skip matrix), whole, by
    ``whole`` (a function of the torch tensor that returns its moved value)."""

    gauge: SignedPerm
    axis: int
    signed: bool = True
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class _Job:
    """One block of the output, in file order: ``n`` bytes at ``offset``, written as they
    are, or moved: the output slices ``part`` (along axis 1) of a 3-D block of input
    ``shape`` (axis 1 the residual one) that starts at ``source``. Once the block is
    written, the input before ``release`` is no longer needed."""

    offset: int
    n: int
    move: Move | None = None
    dtype: str = ""
    shape: tuple[int, ...] = ()
    source: int = 0
    part: tuple[int, int] = (0, 0)
    release: int = 0


def _blocks(e: Entry, move: Move) -> Iterator[_Job]:
    """Blocks of at most :data:`BLOCK_BYTES` (at least one slice along the residual axis):
    whole slices before the residual axis, grouped; or, where one such slice is larger, that
    slice's output in ranges of the residual axis, each gathered from the whole slice."""
    size = itemsize(e.dtype)
    axis, d = move.axis, e.shape[move.axis]
    outer = math.prod(e.shape[:axis])
    inner = math.prod(e.shape[axis + 1:])
    row = inner * size  # bytes of one slice along the residual axis
    if d * row <= BLOCK_BYTES:
        per = max(1, BLOCK_BYTES // (d * row)) if d * row else outer
        for o in range(0, outer, per):
            k = min(per, outer - o)
            at = e.begin + o * d * row
            yield _Job(at, k * d * row, move, e.dtype, (k, d, inner), at, (0, d), at + k * d * row)
        return
    per = max(1, BLOCK_BYTES // row)
    for o in range(outer):
        at = e.begin + o * d * row
        for lo in range(0, d, per):
            hi = min(d, lo + per)
            yield _Job(at + lo * row, (hi - lo) * row, move, e.dtype, (1, d, inner), at,
                       (lo, hi), at + d * row if hi == d else at)


def _jobs(layout: Layout, moves: Mapping[str, Move | None], where: str) -> list[_Job]:
    jobs: list[_Job] = []

    def copy(begin: int, end: int) -> None:
        jobs.extend(_Job(o, min(BLOCK_BYTES, end - o), release=min(end, o + BLOCK_BYTES))
                    for o in range(begin, end, BLOCK_BYTES))

    pos = len(layout.header)
    for e in layout.entries:
        copy(pos, e.begin)  # bytes between tensors, if any, kept as they are
        move = moves.get(e.name)
        if move is None:
            copy(e.begin, e.end)
        else:
            if e.dtype not in ST_DTYPES:
                raise GaugefixError(f"{where}: tensor {e.name!r} has dtype {e.dtype}, which "
                                    "gaugefix cannot move")
            if move.whole is not None:
                torch_dtype(e.dtype, f"{where}: tensor {e.name!r}")
                jobs.append(_Job(e.begin, e.end - e.begin, move, e.dtype, e.shape, e.begin,
                                 release=e.end))
            else:
                jobs.extend(j for j in _blocks(e, move) if j.n)
        pos = e.end
    copy(pos, layout.size)
    return jobs


def _move(job: _Job, src: memoryview, dst: memoryview) -> None:
    """One block through the primitive, from the mapped input into an output buffer."""
    assert job.move is not None
    if job.move.whole is not None:  # a tensor with several residual axes, in torch
        import torch

        dtype = torch_dtype(job.dtype)
        t = torch.frombuffer(bytearray(src), dtype=dtype).reshape(job.shape)
        out = torch.frombuffer(dst, dtype=dtype).reshape(job.shape)
        out.copy_(job.move.whole(t))
        return
    dt = ST_DTYPES[job.dtype]
    k, _, inner = job.shape
    lo, hi = job.part
    job.move.gauge.apply(np.frombuffer(src, dtype=dt.numpy).reshape(job.shape), 1,
                         job.move.signed, out=np.frombuffer(dst, dtype=dt.numpy).reshape(
                             k, hi - lo, inner), bits=dt.is_float, part=job.part)


_PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # not on every system


_fallocate = getattr(os, "posix_fallocate", None)  # not on every system


def _copy(src: memoryview, dst: memoryview) -> None:
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))  # GIL released


def _run(data: memoryview, mm: mmap.mmap | None, out: memoryview, mm_out: mmap.mmap,
         shift: int, jobs: list[_Job], hashes: Hashes, depth: int = 8,
         movers: int | None = None) -> None:
    """Blocks from the mapped input ``data`` to the mapped output ``out`` (at ``shift``
    bytes from where they were: the header may have changed), on ``movers`` threads:
    moved through the primitive straight into the output's pages (no buffer, no copy into
    the page cache: a ``write`` of each block cost a third of the time), untouched bytes
    copied. The calling thread takes the blocks in file order as they finish, feeds the
    hashes and unmaps the pages of both files it is done with (they stay in the page cache),
    keeping at most ``depth`` blocks in flight. numpy's gather and copy and sha256 release
    the GIL, so the stages overlap. Any failure stops every stage and is raised here."""
    movers = movers or max(1, min(4, (os.cpu_count() or 1)))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=movers)
    flight: collections.deque[tuple[concurrent.futures.Future[Any], memoryview, memoryview,
                                    int]] = collections.deque()
    hashing: collections.deque[tuple[list[concurrent.futures.Future[Any]], int]] = \
        collections.deque()
    done = 0  # input bytes before this (output: plus shift) are hashed: their pages can go

    def release(upto: int) -> None:
        nonlocal done
        upto = upto // _PAGE * _PAGE
        if _DONTNEED is None or upto - done < BLOCK_BYTES:
            return
        if mm is not None:
            mm.madvise(_DONTNEED, done, upto - done)
        lo = -(-(done + shift) // _PAGE) * _PAGE
        hi = (upto + shift) // _PAGE * _PAGE
        if hi > lo:
            mm_out.madvise(_DONTNEED, lo, hi - lo)
        done = upto

    def finish(block: bool) -> None:  # hashed blocks, in order: their pages can go
        while hashing and (block or all(f.done() for f in hashing[0][0])):
            futs, end = hashing.popleft()
            for fut in futs:
                fut.result()
            release(end)
            block = False

    def settle() -> None:  # the oldest block: done moving, so hash it
        fut, src, dst, end = flight.popleft()
        fut.result()
        hashing.append((hashes.feed(src, dst), end))
        finish(block=len(hashing) > depth)

    try:
        for job in jobs:
            src = data[job.offset:job.offset + job.n]  # what the input has where we write
            dst = out[job.offset + shift:job.offset + shift + job.n]
            if job.move is None:
                fut = pool.submit(_copy, src, dst)
            else:
                whole = data[job.source:job.source + math.prod(job.shape) * itemsize(job.dtype)]
                fut = pool.submit(_move, job, whole, dst)
            flight.append((fut, src, dst, job.release))
            while len(flight) > depth or (flight and flight[0][0].done()):
                settle()
        while flight:
            settle()
        finish(block=True)
    finally:
        for fut, *_ in flight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _mapped(f: BinaryIO, write: bool = False
            ) -> Iterator[tuple[memoryview, mmap.mmap | None]]:
    """The whole file, mapped (read-only unless ``write``; an empty file: empty bytes)."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        yield memoryview(bytearray() if write else b""), None
        return
    # no MADV_WILLNEED: on a warm cache it costs seconds per GB here (the kernel's own
    # readahead on faults serves a cold one)
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ)
    try:
        yield memoryview(mm), mm
    finally:
        # arrays viewing the mapping may outlive this block by a moment (a cancelled
        # worker's); the mapping is released when the last of them goes
        with contextlib.suppress(BufferError):
            mm.close()


def _allocate(f: BinaryIO, size: int, where: Path) -> None:
    """Give the output file its size with its blocks reserved: a write through a mapping
    to a block the disk has no room for would kill the process (SIGBUS), so a full disk is
    found here, as an error."""
    f.truncate(size)
    if size and _fallocate is not None:
        try:
            _fallocate(f.fileno(), 0, size)
        except OSError as exc:
            raise GaugefixError(f"{where}: cannot allocate {size} bytes ({exc.strerror})") \
                from exc


def rewrite(src: Path, dst: Path, moves: Mapping[str, Move | None], *,
            hashes: Hashes | None = None, metadata: Mapping[str, str] | None = None) -> int:
    """Write ``src`` to ``dst`` with each tensor named in ``moves`` moved (``None``: copied
    as bytes). ``metadata`` replaces the header's metadata. Returns the bytes written."""
    layout = read_layout(src)
    hashes = hashes or Hashes(False, False)
    jobs = _jobs(layout, moves, str(src))
    header = layout.header if metadata is None else with_metadata(layout, metadata)
    size = layout.size + len(header) - len(layout.header)
    with open(src, "rb", buffering=0) as fi, open(dst, "w+b", buffering=0) as fo:
        if os.fstat(fi.fileno()).st_size != layout.size:
            raise GaugefixError(f"{src}: changed while being read")
        _allocate(fo, size, dst)
        fo.write(header)
        for fut in hashes.feed(layout.header, header):
            fut.result()
        with _mapped(fi) as (data, mm), _mapped(fo, write=True) as (out, mm_out):
            if mm_out is None:  # pragma: no cover - a header is never empty
                raise GaugefixError(f"internal error: {dst} is empty")
            _run(data, mm, out, mm_out, len(header) - len(layout.header), jobs, hashes)
        written = os.fstat(fo.fileno()).st_size
    if written != size:
        raise GaugefixError(f"internal error: {dst} has {written} bytes, expected {size}")
    return written


def move_of(op: Any, gauge: SignedPerm, ndim: int) -> Move | None:
    """How an :class:`~gaugefix.arch.Op` moves a tensor of ``ndim`` axes: along its residual
    axis, in blocks; whole when it has two (a residual-to-residual map); None: untouched."""
    axes = op.axes
    if not axes:
        return None
    if len(axes) > 1:
        return Move(gauge, 0, whole=lambda t: op(gauge, t))
    return Move(gauge.tiled(op.blocks), axes[0] if axes[0] >= 0 else axes[0] + ndim, op.signed)


def gauge_moves(plan: Mapping[str, Any], gauge: SignedPerm, layout: Layout
                ) -> dict[str, Move | None]:
    """Per tensor of ``layout``: how the plan's :class:`~gaugefix.arch.Op` moves it (its
    residual axis, signed or not), or None for untouched tensors."""
    return {e.name: move_of(plan[e.name], gauge, len(e.shape)) for e in layout.entries}


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
            import torch

            item = itemsize(e.dtype)
            dtype = torch_dtype(e.dtype, str(path))
            buf = _read(self._files[path], e.begin + start * item, count * item)
            return torch.frombuffer(buf, dtype=dtype) if count else torch.empty(0, dtype=dtype)
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
    item = itemsize(e.dtype)
    n = math.prod(e.shape)
    per = max(1, BLOCK_BYTES // item)
    for start in range(0, n, per):
        yield start, min(per, n - start)
