"""Safe input and output: nothing a user gives gaugefix is ever lost.

**Outputs.** Every file or directory gaugefix writes is built under a temporary
sibling name and published by a rename only when complete. The outputs of one
command form a :func:`transaction`: they are published together when the command
succeeds, and on any failure (an error, Ctrl-C, SIGTERM, SIGHUP) every temporary
is removed and outputs already published are rolled back. Publishing never
replaces an existing output unless ``overwrite``; the existence check *is* the
publishing step (``link`` for files, ``rename`` of a non-empty directory for
directories, both refusing an existing target atomically), so of two concurrent
writers to one output exactly one wins and the other gets a clean error.

An output may never be, contain or lie inside an input of the same command, with
or without ``overwrite``. Every reader below (and :meth:`Checkpoint.open`) notes
what it reads in the running transaction, which checks its outputs against those
inputs before anything is published.

Temporaries are named ``.NAME.gaugefix-tmp.HOST.PID.XXXXXXXX`` (and an output set
aside by ``--overwrite`` ``.NAME.gaugefix-old...``): the next run that writes NAME
removes those left by a dead process on this host (SIGKILL, power loss) and
restores a set-aside output whose replacement never arrived, with a warning.

**Inputs.** JSON, torch and safetensors files are read through helpers that turn
every way a file can be wrong into one :class:`GaugefixError` naming the file;
torch files are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distributed import is_main_rank
from .errors import GaugefixError, GaugefixWarning

TMP_MARK = "gaugefix-tmp"
OLD_MARK = "gaugefix-old"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<mark>gaugefix-tmp|gaugefix-old)\."
                      r"(?P<host>[0-9a-f]{6})\.(?P<pid>\d+)\.[0-9a-f]{8}$")


def _sibling(path: Path, mark: str) -> Path:
    return path.with_name(f".{path.name}.{mark}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def recover_stale(path: Path) -> None:
    """Clean up after a killed run that was writing ``path`` (see the module docstring)."""
    parent = path.parent
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(f".{path.name}.gaugefix-")]
    except OSError:
        return
    for e in entries:
        m = _SIBLING.match(e.name)
        if m is None or m["name"] != path.name:
            continue
        pid = int(m["pid"])
        if m["host"] != _HOST or _alive(pid):
            continue  # a run that may still be writing (a concurrent writer): left alone
        if m["mark"] == OLD_MARK and not os.path.lexists(path):
            os.rename(e, path)
            warnings.warn(f"restored {path}: an interrupted --overwrite run (pid {pid}) had set "
                          "it aside", GaugefixWarning, stacklevel=2)
        else:
            _remove(e)
            warnings.warn(f"removed {e.name}, left in {parent} by an interrupted run (pid {pid})",
                          GaugefixWarning, stacklevel=2)


# ---------------------------------------------------------------------------- overlap
def _relation(out: Path, inp: Path) -> str | None:
    """How ``out`` overlaps ``inp`` ('is', 'lies inside', 'contains'), or None. (realpath:
    a link that loops stays as it is; ``Path.resolve`` raises RuntimeError on it.)"""
    ro, ri = Path(os.path.realpath(out)), Path(os.path.realpath(inp))
    if ro == ri:
        return "is"
    if ri in ro.parents:
        return "lies inside"
    if ro in ri.parents:
        return "contains"
    with contextlib.suppress(OSError):
        if ro.exists() and ri.exists() and os.path.samefile(ro, ri):  # hard links
            return "is"
    return None


def check_output(path: str | os.PathLike[str], overwrite: bool,
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse an output that overlaps an input, cannot be written, or exists (unless
    ``overwrite``). Cleans up what a killed run left for it first."""
    path = Path(path)
    for inp in inputs:
        rel = _relation(path, Path(inp))
        if rel is not None:
            raise GaugefixError(f"output {path} {rel} the input {inp}; inputs are never "
                                "modified (not even with --overwrite)")
    parent = path.parent
    if not parent.is_dir():
        raise GaugefixError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GaugefixError(f"cannot write into {parent} (permission denied)")
    recover_stale(path)
    if os.path.lexists(path) and not overwrite:
        raise GaugefixError(f"output {path} already exists (pass --overwrite to replace it)")


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists (atomically)."""
    if src.is_dir():
        try:  # POSIX rename of a directory fails onto anything but an empty directory
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise
        return
    try:
        os.link(src, dst)  # fails if dst exists, atomically
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


# ---------------------------------------------------------------------------- transactions
@dataclass
class _Output:
    path: Path
    tmp: Path
    overwrite: bool
    ready: bool = False
    backup: Path | None = None


@dataclass
class Transaction:
    """The outputs and inputs of one command (see the module docstring)."""

    inputs: list[Path] = field(default_factory=list)
    outputs: list[_Output] = field(default_factory=list)

    def add_inputs(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Record inputs. A directory brings every symbolic link below it too: a file a
        library reads through the directory (transformers' ``from_pretrained``, a tokenizer)
        may live elsewhere, and overlap is checked against where each link leads."""
        for p in paths:
            p = Path(p)
            if not os.path.lexists(p) or p in self.inputs:
                continue
            self.inputs.append(p)
            if p.is_dir():
                self.inputs.extend(q for q in _links_below(p) if q not in self.inputs)

    def check(self, path: Path, overwrite: bool, others: Iterable[Path] = ()) -> None:
        """Refuse ``path`` as an output (see :func:`check_output`), also if it overlaps
        another output of this command (reserved ones, or ``others``)."""
        for other in (*others, *(o.path for o in self.outputs)):
            rel = _relation(path, other)
            if rel is not None:
                raise GaugefixError(f"output {path} {rel} another output of this command, "
                                    f"{other}")
        check_output(path, overwrite, self.inputs)

    def reserve(self, path: Path, overwrite: bool, *, is_dir: bool) -> _Output:
        self.check(path, overwrite)
        out = _Output(path, _sibling(path, TMP_MARK), overwrite)
        # registered before it exists: a signal between the two would otherwise leave a
        # temporary no abort knows of (removing one that was never made is a no-op)
        self.outputs.append(out)
        if is_dir:
            out.tmp.mkdir()
        return out

    def discard(self, out: _Output) -> None:
        _remove(out.tmp)
        self.outputs.remove(out)

    def abort(self) -> None:
        for o in self.outputs:
            _remove(o.tmp)
        self.outputs.clear()

    def commit(self) -> None:
        """Publish every output, or (on any failure) none: temporaries removed, outputs
        already published rolled back. Under torchrun only rank 0 publishes (every rank
        computed the same result)."""
        if not is_main_rank():
            self.abort()
            return
        done: list[_Output] = []
        try:
            for o in self.outputs:  # inputs read after an output was reserved count too
                for inp in self.inputs:
                    rel = _relation(o.path, inp)
                    if rel is not None:
                        raise GaugefixError(f"output {o.path} {rel} the input {inp}; inputs "
                                            "are never modified (not even with --overwrite)")
                if not o.ready or not os.path.lexists(o.tmp):
                    raise GaugefixError(f"internal error: {o.path} was never completed")
            for o in self.outputs:
                _publish(o)
                done.append(o)
        except BaseException:
            for o in reversed(done):
                _unpublish(o)
            self.abort()
            raise
        for o in done:
            if o.backup is not None:
                _remove(o.backup)
        self.outputs.clear()


def _links_below(root: Path) -> list[Path]:
    """Every symbolic link inside ``root`` (links to directories are not descended)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            q = Path(dirpath) / name
            if q.is_symlink():
                found.append(q)
    return found


def _publish(o: _Output) -> None:
    if o.overwrite and os.path.lexists(o.path):
        o.backup = _sibling(o.path, OLD_MARK)
        os.rename(o.path, o.backup)
    try:
        _rename_noreplace(o.tmp, o.path)
    except FileExistsError:
        if o.backup is not None:  # someone published in between: theirs stays
            _remove(o.backup)
            o.backup = None
        raise GaugefixError(f"output {o.path} was created by another process while this one "
                            "ran; nothing of this run was kept") from None
    except BaseException:
        if o.backup is not None and not os.path.lexists(o.path):
            os.rename(o.backup, o.path)
            o.backup = None
        raise


def _unpublish(o: _Output) -> None:
    _remove(o.path)
    if o.backup is not None:
        os.rename(o.backup, o.path)
        o.backup = None


_CURRENT: ContextVar[Transaction | None] = ContextVar("gaugefix_transaction", default=None)


@contextlib.contextmanager
def transaction(inputs: Iterable[str | os.PathLike[str]] = ()) -> Iterator[Transaction]:
    """Group the outputs written inside the block: all are published at its end, or
    none. Nested blocks join the outermost transaction."""
    outer = _CURRENT.get()
    if outer is not None:
        outer.add_inputs(inputs)
        yield outer
        return
    tx = Transaction()
    tx.add_inputs(inputs)
    token = _CURRENT.set(tx)
    try:
        yield tx
    except BaseException:
        tx.abort()
        raise
    else:
        tx.commit()
    finally:
        _CURRENT.reset(token)


def note_input(path: str | os.PathLike[str]) -> None:
    """Record that the running command reads ``path`` (no effect outside a transaction)."""
    tx = _CURRENT.get()
    if tx is not None:
        tx.add_inputs([path])


@contextlib.contextmanager
def _atomic(path: str | os.PathLike[str], overwrite: bool,
            inputs: Iterable[str | os.PathLike[str]], is_dir: bool) -> Iterator[Path]:
    with transaction(inputs) as tx:
        out = tx.reserve(Path(path), overwrite, is_dir=is_dir)
        try:
            yield out.tmp
            if not os.path.lexists(out.tmp):
                raise GaugefixError(f"internal error: nothing was written for {path}")
        except BaseException:
            tx.discard(out)
            raise
        out.ready = True


PathLike = str | os.PathLike[str]


def atomic_dir(path: PathLike, *, overwrite: bool = False,
               inputs: Iterable[PathLike] = ()) -> contextlib.AbstractContextManager[Path]:
    """A temporary directory that becomes ``path`` when the transaction commits."""
    return _atomic(path, overwrite, inputs, True)


def atomic_file(path: PathLike, *, overwrite: bool = False,
                inputs: Iterable[PathLike] = ()) -> contextlib.AbstractContextManager[Path]:
    """A temporary file path that becomes ``path`` when the transaction commits."""
    return _atomic(path, overwrite, inputs, False)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    with atomic_file(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(text)
    return Path(path)


def no_bar(progress: bool) -> bool | None:
    """tqdm's ``disable``: a progress bar only when asked for and stderr is a terminal (so a
    captured or piped stderr holds messages, not bars). Said here, not by tqdm, so that a
    command whose bar cannot show need not import it (15% of ``apply``'s start-up)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return None if progress and isatty is not None and isatty() else True


def copy_files(src_dir: Path, dst_dir: Path, exclude: set[str] | frozenset[str]) -> None:
    """Copy every top-level file of ``src_dir`` except the names in ``exclude`` (the
    files an adapter rewrites): configs, tokenizers and other side files travel along."""
    for item in Path(src_dir).iterdir():
        if item.is_file() and item.name not in exclude:
            shutil.copy2(item, Path(dst_dir) / item.name)


def blake3_files(paths: list[Path]) -> str:
    """A checkpoint's identity: BLAKE3 of its weight files' bytes, concatenated in the given
    order (what ``cat FILES | b3sum`` prints), hashed on every core."""
    from blake3 import blake3

    h = blake3(max_threads=blake3.AUTO)
    for p in paths:
        h.update_mmap(p)
    return h.hexdigest()


# ---------------------------------------------------------------------------- JSON out
def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as ``null`` (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def has_non_finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, Mapping):
        return any(has_non_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(has_non_finite(v) for v in obj)
    return False


# ---------------------------------------------------------------------------- readers
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}

MiB = 1 << 20
# The most gaugefix reads of each kind of small input. A gauge file for d = 65536 is a few
# MiB, a neuron list or claim of every coordinate of such a model tens; a configuration,
# shard index or YAML file far less. Weight files (torch, safetensors) have no limit but
# must be regular files too.
JSON_LIMIT = 256 * MiB
TEXT_LIMIT = 256 * MiB

_FILE_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def json_type(value: Any) -> str:
    """How a JSON value is named in error messages ('an object', 'a list', ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def _not_regular(p: Path, mode: int, what: str) -> GaugefixError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
    return GaugefixError(f"{p}: not a regular file ({kind}); expected a {what}")


def check_regular(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a regular file (after links); else one error saying what it is
    instead: gaugefix never reads a device (``/dev/zero`` is endless), a FIFO (reading it
    blocks) or a socket. Only ``stat``: nothing is opened."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise GaugefixError(f"{what} not found: {p}") from None
    except OSError as exc:
        raise GaugefixError(f"{p}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise GaugefixError(f"{p} is a directory; expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, st.st_mode, what)
    return p


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str], what: str,
                 limit: int | None = None) -> Iterator[Any]:
    """A binary handle on a regular file of at most ``limit`` bytes (None: any size), noted
    as an input. The file is checked before it is opened and again through the handle, so a
    FIFO swapped in between is never read (opened non-blocking, so the open cannot hang)."""
    p = check_regular(path, what)
    note_input(p)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise GaugefixError(f"{p}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(p, st.st_mode, what)
        if limit is not None and st.st_size > limit:
            raise GaugefixError(f"{p}: {_size(st.st_size)}, more than the {_size(limit)} a "
                                f"{what} may have")
        yield f


def read_bytes(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (also if it grows while read)."""
    with open_regular(path, what, limit) as f:
        try:  # read(n) sets n bytes aside: ask for the size there is, then for any growth
            data = f.read(os.fstat(f.fileno()).st_size + 1)
            while len(data) <= limit and (more := f.read(min(MiB, limit + 1 - len(data)))):
                data += more
        except OSError as exc:
            raise GaugefixError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) > limit:
        raise GaugefixError(f"{path}: more than the {_size(limit)} a {what} may have")
    return data


def read_text(path: str | os.PathLike[str], what: str, *, limit: int = TEXT_LIMIT) -> str:
    """A UTF-8 text file (a regular file of at most ``limit`` bytes), or one error line
    saying why it cannot be read."""
    p = Path(path)
    try:
        return read_bytes(p, what, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise GaugefixError(f"{p}: not a UTF-8 text file ({what})") from None


def read_json(path: str | os.PathLike[str], what: str,
              expect: type | tuple[type, ...] | None = dict, *, limit: int = JSON_LIMIT) -> Any:
    """A JSON document (at most ``limit`` bytes), with its top-level type checked
    (``expect``)."""
    p = Path(path)
    text = read_text(p, what, limit=limit)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GaugefixError(f"{p}: not valid JSON ({exc})") from None
    except RecursionError:
        raise GaugefixError(f"{p}: JSON nested too deeply to be a {what}") from None
    if expect is not None and not isinstance(doc, expect):
        want = expect if isinstance(expect, tuple) else (expect,)
        names = " or ".join(_JSON_TYPES[t].split()[-1] for t in want)
        raise GaugefixError(f"{p}: expected a JSON {names} ({what}), found {json_type(doc)}")
    return doc


_BLOCKED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


def torch_load(path: str | os.PathLike[str], what: str, allowed: Iterable[type] = (), *,
               limit: int | None = None, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (and only ``allowed`` classes), its many
    failure modes turned into one line. Never suggests the unsafe load. A regular file of
    at most ``limit`` bytes; ``mmap``: tensors map the file rather than being read whole
    (a caller that needs only part of them reads only that part)."""
    import pickle
    import zipfile

    import torch

    with open_regular(path, what, limit):
        pass
    p = Path(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:  # a legacy (pre-zip) file cannot be mapped
                if not mmap or "mmap" not in str(exc):
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = _BLOCKED_GLOBAL.search(str(exc))
        if m:
            raise GaugefixError(
                f"{p}: refused: this {what} would need {m[1]} to unpickle, and gaugefix never "
                "runs code from a file (torch files are read with weights_only=True); save "
                "the tensors as safetensors or a plain state dict") from None
        raise GaugefixError(f"{p}: not a {what} readable as a weights-only torch file") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().split("\n", 1)[0][:200]
        raise GaugefixError(f"{p}: not a readable torch file ({first})") from None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str], what: str = "safetensors file", *,
                     framework: str = "pt") -> Iterator[Any]:
    """``safe_open`` with a truncated or forged file reported as one line naming it
    (``framework="numpy"`` for headers and shapes only: it does not import torch)."""
    from safetensors import SafetensorError, safe_open

    p = check_regular(path, what)
    note_input(p)
    try:
        handle = safe_open(str(p), framework)
    except (SafetensorError, OSError) as exc:
        raise GaugefixError(f"{p}: not a valid {what} ({exc})") from None
    try:
        with handle as f:
            yield f
    except SafetensorError as exc:
        raise GaugefixError(f"{p}: not a valid {what} ({exc})") from None


def load_safetensors(path: str | os.PathLike[str], what: str = "safetensors file"
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a safetensors file, and its metadata."""
    with open_safetensors(path, what) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def load_npy(path: str | os.PathLike[str], what: str, *, limit: int | None = None,
             mmap: bool = False) -> Any:
    """A numeric ``.npy`` array (never pickled objects) from a regular file of at most
    ``limit`` bytes; ``mmap``: mapped, not read (a caller that needs a slice reads only it)."""
    import numpy as np

    with open_regular(path, what, limit):
        pass
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise GaugefixError(f"{p}: not a numeric .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise GaugefixError(f"{p}: not a numeric .npy array")
    return arr
