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
import os
import queue
import struct
import threading
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


MoveFn = Callable[[torch.Tensor, int, torch.Tensor], Any]


@dataclass(frozen=True)
class _Job:
    """One block of the output, in file order: ``n`` bytes read at ``offset`` and written
    as they are, or moved (``move(block, 1, out)`` on a 3-D block of ``shape``)."""

    offset: int
    n: int
    move: MoveFn | None = None
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()


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


def _jobs(layout: Layout, moves: Mapping[str, tuple[int, MoveFn] | None], where: str
          ) -> list[_Job]:
    jobs: list[_Job] = []

    def copy(begin: int, end: int) -> None:
        jobs.extend(_Job(o, min(BLOCK_BYTES, end - o)) for o in range(begin, end, BLOCK_BYTES))

    pos = len(layout.header)
    for e in layout.entries:
        copy(pos, e.begin)  # bytes between tensors, if any, kept as they are
        spec = moves.get(e.name)
        if spec is None:
            copy(e.begin, e.end)
        else:
            if e.dtype not in DTYPES:
                raise GaugefixError(f"{where}: tensor {e.name!r} has dtype {e.dtype}, which "
                                    "this torch cannot represent")
            jobs.extend(_Job(o, n, spec[1], DTYPES[e.dtype], shape)
                        for o, n, shape in _blocks(e, spec[0]) if n)
        pos = e.end
    copy(pos, layout.size)
    return jobs


_DONE = object()


def _run(fi: BinaryIO, fo: BinaryIO, jobs: list[_Job], hashes: Hashes, depth: int = 3
         ) -> None:
    """Read → move → write as a pipeline: a reader thread fills reused buffers, this thread
    moves blocks through the primitive, a writer thread writes them and feeds the hashes.
    The heavy calls (pread, numpy's gather, write, sha256) release the GIL, so the stages
    overlap. Buffers are recycled once written and hashed (fresh memory costs a page fault
    per 4 KiB). Any failure stops every stage and is raised here."""
    free: queue.Queue[list[bytearray]] = queue.Queue()
    for _ in range(depth + 2):
        free.put([bytearray(), bytearray()])
    to_move: queue.Queue[Any] = queue.Queue(maxsize=depth)
    to_write: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue[Any], item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(q: queue.Queue[Any]) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def reader() -> None:
        try:
            for job in jobs:
                bufs = get(free)
                if bufs is _DONE:
                    return
                for k in (0, 1) if job.move else (0,):
                    if len(bufs[k]) < job.n:
                        bufs[k] = bytearray(job.n)
                _readinto(fi, job.offset, memoryview(bufs[0])[:job.n])
                put(to_move, (job, bufs))
            put(to_move, _DONE)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            errors.append(exc)
            stop.set()

    def writer() -> None:
        try:
            while (item := get(to_write)) is not _DONE:
                bufs, data, src = item
                fo.write(data)
                for fut in hashes.feed(src, data):
                    fut.result()
                free.put(bufs)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, daemon=True),
               threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    try:
        while (item := get(to_move)) is not _DONE:
            job, bufs = item
            src = memoryview(bufs[0])[:job.n]
            if job.move is None:
                put(to_write, (bufs, src, src))
                continue
            dst = memoryview(bufs[1])[:job.n]
            job.move(torch.frombuffer(src, dtype=job.dtype).reshape(job.shape), 1,
                     torch.frombuffer(dst, dtype=job.dtype).reshape(job.shape))
            put(to_write, (bufs, dst, src))
        put(to_write, _DONE)
        threads[1].join()
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def rewrite(src: Path, dst: Path, moves: Mapping[str, tuple[int, MoveFn] | None], *,
            hashes: Hashes | None = None, metadata: Mapping[str, str] | None = None) -> int:
    """Write ``src`` to ``dst`` with each tensor named in ``moves`` moved along its residual
    axis (``(axis, fn)``: ``fn(block, axis, out)`` writes the moved block into ``out``;
    ``None``: copied as bytes). ``metadata`` replaces the header's metadata. Returns the
    bytes written."""
    layout = read_layout(src)
    hashes = hashes or Hashes(False, False)
    jobs = _jobs(layout, moves, str(src))
    header = layout.header if metadata is None else with_metadata(layout, metadata)
    with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
        fo.write(header)
        for fut in hashes.feed(layout.header, header):
            fut.result()
        _run(fi, fo, jobs, hashes)
        written = fo.tell()
    expected = layout.size + len(header) - len(layout.header)
    if written != expected:
        raise GaugefixError(f"internal error: {dst} has {written} bytes, expected {expected}")
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
        out[e.name] = (axis, lambda t, ax, dst, signed=signed: gauge.apply(t, ax, signed,
                                                                           out=dst))
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
