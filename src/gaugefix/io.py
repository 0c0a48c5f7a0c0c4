"""Safe output: temporary path, then rename into place; existing outputs refused.

Every file or directory gaugefix writes goes through these helpers, so an
interrupted run never leaves a half-written output behind and an input is never
modified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import GaugefixError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def check_output(path: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an existing output (unless ``overwrite``) and any output that is an input."""
    resolved = path.resolve()
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if resolved == inp_r or inp_r in resolved.parents or resolved in inp_r.parents:
            raise GaugefixError(
                f"output {path} overlaps the input {inp}; inputs are never modified"
            )
    if path.exists() and not overwrite:
        raise GaugefixError(f"output {path} already exists (pass --overwrite to replace it)")
    if not path.parent.exists():
        raise GaugefixError(f"output directory {path.parent} does not exist")


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        old = _tmp_sibling(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False,
               inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_output(path, overwrite, inputs)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = False,
                inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_output(path, overwrite, inputs)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise GaugefixError(f"internal error: nothing was written for {path}")
        _replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, overwrite: bool = False) -> Path:
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return path


def copy_files(src_dir: Path, dst_dir: Path, exclude: set[str] | frozenset[str]) -> None:
    """Copy every top-level file of ``src_dir`` except the names in ``exclude`` (the
    files an adapter rewrites): configs, tokenizers and other side files travel along."""
    for item in Path(src_dir).iterdir():
        if item.is_file() and item.name not in exclude:
            shutil.copy2(item, Path(dst_dir) / item.name)


def sha256_files(paths: list[Path]) -> str:
    """Content hash of a checkpoint's weight files (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()
