"""Safetensors shards rewritten tensor by tensor: disk speed, bounded memory, hashed in passing.

A gauge changes no tensor's name, dtype or shape, so a shard keeps its header, and every
tensor its place in the file. The rewrite reads the input once, in file order: an untouched
tensor is copied as the bytes it is; a moved tensor goes through the single primitive
(:meth:`SignedPerm.apply`, on numpy views of its bits: no torch needed) in blocks of at most
:data:`BLOCK_BYTES` of output (whole slices before its residual axis, or a range of the
residual axis gathered from the whole slice), and is written where it was. Every byte read
and written can be fed to a running hash of each file, so a checkpoint's identity (BLAKE3 of
its weight files) costs no second read; the hashing runs on other threads, overlapping the
I/O. Blocks are small so that many are in flight on few threads and each stays in the cache
while it is written and hashed.

The input is mapped, not read: the gather reads its page cache directly. A moved block is
gathered into a buffer and written from there with ``pwrite`` (gathering straight into a
mapped output made the kernel zero every page before the gather overwrote it: a third of
the time); untouched bytes never pass through this process (``os.copy_file_range``: a
reflink where the filesystem shares blocks, else a copy between page caches). The output's
blocks are reserved first, so a full disk is found before anything is written. Pages of the
input already hashed are unmapped as the rewrite goes (they stay in the page cache), so the
resident set does not grow with the file.

One engine does the streaming, :func:`stream`: it hands each block, moved or not, in file
order, to a :class:`Sink`. :class:`WriteSink` writes the rewritten file (``apply``,
:func:`rewrite`), :class:`DigestSink` hashes each tensor in the chart a gauge leads to (the
fingerprint), and ``gaugefix.transport.merge.MergeSink`` merges each block of A with B's (and
a base's) at the same elements.

Peak memory: a few blocks of :data:`BLOCK_BYTES`, and one copy of the largest tensor with
several residual axes (moved whole, in torch).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .errors import GaugefixError
from .group import SignedPerm

if TYPE_CHECKING:
    import torch

# a block's output: small enough to stay in the cache between its gather and its write (and
# hashing), large enough that the per-block Python is noise (apply of bench_apply's
# checkpoint: 1 MiB took 2-12% less CPU than 4 MiB in the best runs, ~30% less in the
# median ones; 512 KiB more than 1 MiB)
BLOCK_BYTES = 1 << 20


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
    """BLAKE3 of the input and of the output stream (a checkpoint's identity, as
    :func:`gaugefix.io.blake3_files` computes it from the files), each on its own worker
    thread (blake3 releases the GIL, so both run beside the moves), in submission order."""

    def __init__(self, src: bool, dst: bool) -> None:
        from blake3 import blake3

        self.src = blake3() if src else None
        self.dst = blake3() if dst else None
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
class Block:
    """One block of a stream, in file order: ``n`` bytes at file ``offset`` (the same place
    in a rewritten file: a gauge moves no tensor), of tensor ``entry`` (``None``: bytes
    between tensors or after the last, kept as they are). Untouched (``move`` is ``None``),
    or moved: the output slices ``part`` (along axis 1) of a 3-D block of input ``shape``
    (axis 1 the residual one) that starts at ``source``; a tensor moved whole (``Move.whole``)
    is one block of its own shape. Once a sink has taken the block, the input before
    ``release`` is no longer needed."""

    offset: int
    n: int
    entry: Entry | None = None
    move: Move | None = None
    shape: tuple[int, ...] = ()
    source: int = 0
    part: tuple[int, int] = (0, 0)
    release: int = 0

    @property
    def elements(self) -> tuple[int, int]:
        """(first element, count) of the block within its tensor, in its storage order."""
        if self.entry is None:
            return 0, 0
        size = itemsize(self.entry.dtype)
        return (self.offset - self.entry.begin) // size, self.n // size


def _moved_blocks(e: Entry, move: Move) -> Iterator[Block]:
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
            yield Block(at, k * d * row, e, move, (k, d, inner), at, (0, d), at + k * d * row)
        return
    per = max(1, BLOCK_BYTES // row)
    for o in range(outer):
        at = e.begin + o * d * row
        for lo in range(0, d, per):
            hi = min(d, lo + per)
            yield Block(at + lo * row, (hi - lo) * row, e, move, (1, d, inner), at, (lo, hi),
                        at + d * row if hi == d else at)


def plan_blocks(layout: Layout, moves: Mapping[str, Move | None], where: str = "") -> list[Block]:
    """Every byte of a safetensors file after its header, as blocks in file order: each
    tensor named in ``moves`` (not ``None``) moved, everything else untouched (a tensor's
    untouched blocks hold whole elements)."""
    blocks: list[Block] = []

    def copy(begin: int, end: int, e: Entry | None = None) -> None:
        size = itemsize(e.dtype) if e is not None and e.dtype in ST_DTYPES else 1
        step = max(1, BLOCK_BYTES // size) * size
        blocks.extend(Block(o, min(step, end - o), e, release=min(end, o + step))
                      for o in range(begin, end, step))

    pos = len(layout.header)
    for e in layout.entries:
        copy(pos, e.begin)  # bytes between tensors, if any, kept as they are
        move = moves.get(e.name)
        if move is None:
            copy(e.begin, e.end, e)
        elif e.dtype not in ST_DTYPES:
            raise GaugefixError(f"{where}: tensor {e.name!r} has dtype {e.dtype}, which "
                                "gaugefix cannot move")
        elif move.whole is not None:
            torch_dtype(e.dtype, f"{where}: tensor {e.name!r}")
            blocks.append(Block(e.begin, e.end - e.begin, e, move, e.shape, e.begin,
                                release=e.end))
        else:
            blocks.extend(b for b in _moved_blocks(e, move) if b.n)
        pos = e.end
    copy(pos, layout.size)
    return blocks


def move_block(block: Block, data: memoryview, dst: memoryview) -> None:
    """One moved block through the primitive, from ``data`` (the whole input file, mapped)
    into ``dst`` (its ``block.n`` bytes of output): what every stream runs per block."""
    move, e = block.move, block.entry
    assert move is not None and e is not None
    src = data[block.source:block.source + math.prod(block.shape) * itemsize(e.dtype)]
    if move.whole is not None:  # a tensor with several residual axes, in torch
        import torch

        dtype = torch_dtype(e.dtype)
        t = torch.frombuffer(bytearray(src), dtype=dtype).reshape(block.shape)
        out = torch.frombuffer(dst, dtype=dtype).reshape(block.shape)
        out.copy_(move.whole(t))
        return
    dt = ST_DTYPES[e.dtype]
    k, _, inner = block.shape
    lo, hi = block.part
    move.gauge.apply(np.frombuffer(src, dtype=dt.numpy).reshape(block.shape), 1, move.signed,
                     out=np.frombuffer(dst, dtype=dt.numpy).reshape(k, hi - lo, inner),
                     bits=dt.is_float, part=block.part)


_PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # not on every system


_fallocate = getattr(os, "posix_fallocate", None)  # not on every system
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
# what copy_file_range says where it cannot copy between these two files (another
# filesystem on an old kernel, a filesystem without it): the bytes are written instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _pwrite(fd: int, data: memoryview, at: int) -> None:
    """All of ``data`` at file offset ``at`` (``pwrite`` releases the GIL)."""
    while data:
        k = os.pwrite(fd, data, at)
        data, at = data[k:], at + k


def _copy_range(src: int, dst: int, src_at: int, dst_at: int, data: memoryview) -> None:
    """The ``len(data)`` bytes of file ``src`` at ``src_at`` into file ``dst`` at ``dst_at``,
    in the kernel (``os.copy_file_range``), never through this process; where the system
    cannot, written from ``data`` (the same bytes, mapped)."""
    done = 0
    if _copy_file_range is not None:
        try:
            while done < len(data):
                k = _copy_file_range(src, dst, len(data) - done, src_at + done, dst_at + done)
                if not k:
                    raise GaugefixError(f"input ends early (at byte {src_at + done})")
                done += k
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    _pwrite(dst, data[done:], dst_at + done)


def _by_tensor(blocks: list[Block]) -> list[list[Block]]:
    groups: list[list[Block]] = []
    for b in blocks:
        if groups and groups[-1][0].entry is b.entry:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


class Sink:
    """Where the blocks of :func:`stream` go. The engine calls ``open`` once with the file's
    layout and the input file, then per block ``work`` on the worker thread that moved it,
    right after the move (while its bytes are in the cache; blocks side by side, in no
    order), and once that is done, ``take`` on the calling thread in file order, whose
    returned futures say when the sink is done with the bytes (hashing on other threads,
    say); then ``release`` of each input range every block before which has been taken,
    and ``close`` at the end (``ok``: every block was taken), also after a failure.

    A sink whose ``per_tensor`` is true is handed whole tensors instead: each on one worker
    thread, its blocks moved one after another into that thread's buffer, each handed to
    ``work`` right after its move; ``take`` is not called. Tensors run side by side, so a
    long one holds up no other."""

    per_tensor = False

    def work(self, block: Block, out: memoryview) -> None:
        """On a worker thread, after the block's move: ``out`` is its output (the input's
        bytes themselves for an untouched block), valid until the block is taken."""

    def open(self, layout: Layout, source: BinaryIO) -> None:
        """The stream of ``source`` starts (its header is ``layout.header``)."""

    def take(self, block: Block, src: memoryview, out: memoryview
             ) -> Sequence[concurrent.futures.Future[Any]]:
        """``src``: the input's bytes at the block's place; ``out``: the block's output
        (``src`` itself for an untouched block). Valid until the returned futures are
        done."""
        return ()

    def release(self, begin: int, end: int) -> None:
        """The input's bytes ``begin:end`` (page-aligned) are taken and done with."""

    def close(self, ok: bool) -> None:
        """The stream ends (``ok``) or failed; always called once after ``open``."""


class WriteSink(Sink):
    """Blocks written to ``dst`` where they were, under the input's header or one with other
    ``metadata``: a moved block with ``pwrite`` by the thread that moved it (from its buffer,
    still in the cache), untouched bytes copied in the kernel (:func:`_copy_range`);
    ``hashes`` sees every byte of the input and of the output, on its own threads. The
    output's blocks are reserved first, so a full disk is an error before any block is
    written. ``written``: its size."""

    def __init__(self, dst: Path, *, hashes: Hashes | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.dst = dst
        self.hashes = hashes or Hashes(False, False)
        self.metadata = metadata
        self.written = 0

    def open(self, layout: Layout, source: BinaryIO) -> None:
        header = layout.header if self.metadata is None else with_metadata(layout, self.metadata)
        self.shift = len(header) - len(layout.header)
        self.size = layout.size + self.shift
        self._src = source.fileno()
        self._fo = open(self.dst, "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            _allocate(self._fo, self.size, self.dst)
            _pwrite(self._fo.fileno(), memoryview(header), 0)
            for fut in self.hashes.feed(layout.header, header):
                fut.result()
        except BaseException:
            self._fo.close()
            raise

    def work(self, block: Block, out: memoryview) -> None:
        at = block.offset + self.shift
        if block.move is None:
            _copy_range(self._src, self._fo.fileno(), block.offset, at, out)
        else:
            _pwrite(self._fo.fileno(), out, at)

    def take(self, block: Block, src: memoryview, out: memoryview
             ) -> list[concurrent.futures.Future[Any]]:
        return self.hashes.feed(src, out)

    def close(self, ok: bool) -> None:
        size = os.fstat(self._fo.fileno()).st_size if ok else 0
        self._fo.close()
        if ok:
            if size != self.size:
                raise GaugefixError(f"internal error: {self.dst} has {size} bytes, expected "
                                    f"{self.size}")
            self.written = size


class DigestSink(Sink):
    """sha256 of each tensor's output bytes after ``prefix(entry)`` (its dtype and shape,
    say), in ``digests`` by name, across every file streamed into it. Each block is hashed
    on the thread that moved it, right after the move (a per-tensor sink: a tensor's
    blocks in order on one thread); untouched tensors straight from the mapped input."""

    per_tensor = True

    def __init__(self, prefix: Callable[[Entry], bytes] = lambda e: b"") -> None:
        self.prefix = prefix
        self.digests: dict[str, str] = {}
        self._h: dict[str, Any] = {}

    def open(self, layout: Layout, source: BinaryIO) -> None:
        self._h = {e.name: hashlib.sha256(self.prefix(e)) for e in layout.entries}

    def work(self, block: Block, out: memoryview) -> None:
        if block.entry is not None:
            self._h[block.entry.name].update(out)

    def close(self, ok: bool) -> None:
        if ok:
            self.digests.update((k, h.hexdigest()) for k, h in self._h.items())
        self._h = {}


def stream(path: Path, moves: Mapping[str, Move | None], sink: Sink, *,
           layout: Layout | None = None, depth: int = 8, movers: int | None = None) -> Layout:
    """The one streaming engine: every byte of the safetensors file ``path`` after its
    header, in blocks of at most :data:`BLOCK_BYTES` in file order, each tensor named in
    ``moves`` moved through the primitive, handed to ``sink`` (see :class:`Sink`).

    The input is mapped, not read. Blocks are moved, each into a buffer of the engine's, and
    handed to the sink's ``work`` on ``movers`` threads; the calling thread takes them in
    file order as they finish and hands them to the sink, keeping at most ``depth`` blocks
    in flight and ``depth`` more in the sink's hands; once the sink is done with the bytes,
    the pages of the input it is done with are unmapped (they stay in the page cache).
    numpy's gather, writes and hashing release the GIL, so the stages overlap. Any failure
    stops every stage and is raised here. Returns the file's layout."""
    layout = layout or read_layout(path)
    blocks = plan_blocks(layout, moves, str(path))
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size != layout.size:
            raise GaugefixError(f"{path}: changed while being read")
        with _mapped(f) as (data, mm):
            sink.open(layout, f)
            ok = False
            try:
                _pump(data, mm, blocks, sink, depth, movers)
                ok = True
            finally:
                sink.close(ok)
    return layout


def _pump(data: memoryview, mm: mmap.mmap | None, blocks: list[Block], sink: Sink,
          depth: int, movers: int | None) -> None:
    movers = movers or max(1, min(4, (os.cpu_count() or 1)))
    if sink.per_tensor:
        _pump_tensors(data, mm, blocks, sink, depth, movers)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=movers)
    flight: collections.deque[tuple[concurrent.futures.Future[Any], Block, memoryview,
                                    memoryview, bytearray | None]] = collections.deque()
    taken: collections.deque[tuple[Sequence[concurrent.futures.Future[Any]], int,
                                   bytearray | None]] = collections.deque()
    spare: list[bytearray] = []  # the engine's own buffers, reused (fresh memory faults)
    done = 0  # the sink is done with the input before this: its pages can go

    def release(upto: int) -> None:
        nonlocal done
        upto = upto // _PAGE * _PAGE
        if upto - done < BLOCK_BYTES:
            return
        if mm is not None and _DONTNEED is not None:
            mm.madvise(_DONTNEED, done, upto - done)
        sink.release(done, upto)
        done = upto

    def finish(block: bool) -> None:  # blocks the sink is done with, in order
        while taken and (block or all(f.done() for f in taken[0][0])):
            futs, end, buf = taken.popleft()
            for fut in futs:
                fut.result()
            if buf is not None:
                spare.append(buf)
            release(end)
            block = False

    def settle() -> None:  # the oldest block: moved, so the sink takes it
        fut, b, src, out, buf = flight.popleft()
        fut.result()
        taken.append((sink.take(b, src, out), b.release, buf))
        finish(block=len(taken) > depth)

    def run(b: Block, out: memoryview) -> None:  # on a worker
        if b.move is not None:
            move_block(b, data, out)
        sink.work(b, out)

    try:
        for b in blocks:
            src = data[b.offset:b.offset + b.n]  # what the input has where the block goes
            out, buf = src, None
            if b.move is not None:
                if b.n <= BLOCK_BYTES:
                    buf = spare.pop() if spare else bytearray(BLOCK_BYTES)
                    out = memoryview(buf)[:b.n]
                else:
                    out = memoryview(bytearray(b.n))
            fut = pool.submit(run, b, out)
            flight.append((fut, b, src, out, buf))
            while len(flight) > depth or (flight and flight[0][0].done()):
                settle()
        while flight:
            settle()
        finish(block=True)
    finally:
        for fut, *_ in flight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _pump_tensors(data: memoryview, mm: mmap.mmap | None, blocks: list[Block], sink: Sink,
                  depth: int, movers: int) -> None:
    """A per-tensor sink's stream: tensors (runs of blocks of one tensor) on ``movers``
    threads, each moved block by block into its thread's buffer and handed to ``work``;
    finished in file order, at most ``depth`` tensors in flight, the input's pages they are
    done with unmapped."""
    local = threading.local()

    def run(group: list[Block]) -> None:
        for b in group:
            if b.move is None:
                sink.work(b, data[b.offset:b.offset + b.n])
                continue
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) < b.n:
                buf = local.buf = bytearray(max(BLOCK_BYTES, b.n))
            out = memoryview(buf)[:b.n]
            move_block(b, data, out)
            sink.work(b, out)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=movers)
    flight: collections.deque[tuple[concurrent.futures.Future[Any], int]] = \
        collections.deque()
    done = 0

    def settle() -> None:
        nonlocal done
        fut, end = flight.popleft()
        fut.result()
        upto = end // _PAGE * _PAGE
        if upto - done >= BLOCK_BYTES:
            if mm is not None and _DONTNEED is not None:
                mm.madvise(_DONTNEED, done, upto - done)
            sink.release(done, upto)
            done = upto

    try:
        for group in _by_tensor(blocks):
            flight.append((pool.submit(run, group), group[-1].release))
            while len(flight) > depth or (flight and flight[0][0].done()):
                settle()
        while flight:
            settle()
    finally:
        for fut, _ in flight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _mapped(f: BinaryIO) -> Iterator[tuple[memoryview, mmap.mmap | None]]:
    """The whole file, mapped read-only (an empty file: empty bytes)."""
    if os.fstat(f.fileno()).st_size == 0:
        yield memoryview(b""), None
        return
    # no MADV_WILLNEED: on a warm cache it costs seconds per GB here (the kernel's own
    # readahead on faults serves a cold one)
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield memoryview(mm), mm
    finally:
        # arrays viewing the mapping may outlive this block by a moment (a cancelled
        # worker's); the mapping is released when the last of them goes
        with contextlib.suppress(BufferError):
            mm.close()


def _allocate(f: BinaryIO, size: int, where: Path) -> None:
    """Give the output file its size with its blocks reserved, so that a full disk is found
    here, as an error, before any block is written (and writes into reserved blocks cost
    the file system less)."""
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
    as bytes): :func:`stream` into a :class:`WriteSink`. ``metadata`` replaces the header's
    metadata. Returns the bytes written."""
    sink = WriteSink(dst, hashes=hashes, metadata=metadata)
    stream(src, moves, sink)
    return sink.written

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
