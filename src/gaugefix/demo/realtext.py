"""Real English text that every machine running gaugefix has, with no download.

The demo's grammar corpus is not real text. The experiments on a pretrained model (and the
identity test's independently trained models) need ordinary English prose, offline, the
same on every machine with the same Python: the **documentation that ships with CPython
itself** —

* the Python Language Reference's topics (``pydoc_data.topics``: what ``help("if")``
  prints; about 0.5 MB), and
* the docstrings of the standard library's modules, classes and functions, read from the
  ``.py`` sources with :mod:`ast` (nothing is imported), test packages excluded.

Each docstring or topic is one document. Documents that are mostly code, tables or
symbols are dropped (a document is kept when at least 85% of its characters are letters,
spaces or ordinary punctuation and it has at least ``min_chars`` characters), duplicates
once. The order is fixed (sorted module paths), so the same Python gives the same text;
:attr:`RealText.source` names it with the Python version, and the report says it.
"""

from __future__ import annotations

import ast
import hashlib
import string
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

_PROSE = set(string.ascii_letters + " \n'\",.;:()-?!")
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "dist-packages", "__pycache__", "ensurepip", "pydoc_data"}


@dataclass(frozen=True)
class RealText:
    """Documents of real English text, and where they come from."""

    documents: tuple[str, ...]
    source: str

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.documents)

    @property
    def digest(self) -> str:
        """SHA-256 of the documents (what a report cites to say which text it ran on)."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.encode())
            h.update(b"\x00")
        return h.hexdigest()

    def split(self, held_out: float, seed: int) -> tuple[RealText, RealText]:
        """(train, held out): a seeded split by document, disjoint."""
        if not 0 < held_out < 1:
            raise ValueError(f"held_out {held_out} must be in (0, 1)")
        order = np.random.default_rng(seed).permutation(len(self.documents))
        k = max(1, round(held_out * len(order)))
        pick = [self.documents[i] for i in sorted(order[:k])]
        rest = [self.documents[i] for i in sorted(order[k:])]
        return (RealText(tuple(rest), f"{self.source} (train split, seed {seed})"),
                RealText(tuple(pick), f"{self.source} (held-out split, seed {seed})"))

    def tokens(self, tokenizer: object, n_tokens: int, *, eos: int | None = None
               ) -> np.ndarray:
        """The first ``n_tokens`` token ids of the documents in order, each document
        tokenised by ``tokenizer`` (a transformers tokenizer) and followed by ``eos``
        (default: the tokenizer's EOS id, if any). Fewer if the text runs out."""
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        out: list[int] = []
        for doc in self.documents:
            out += tokenizer(doc, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if eos is not None:
                out.append(int(eos))
            if len(out) >= n_tokens:
                break
        return np.asarray(out[:n_tokens], dtype=np.int64)


def _is_prose(text: str) -> bool:
    return sum(c in _PROSE for c in text) >= 0.85 * len(text)


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                      | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _normalise(text: str) -> str:
    """Paragraphs joined into running text (docstrings wrap at 72-79 columns)."""
    paras = [" ".join(line.strip() for line in p.splitlines()
                      if not (line.strip() and set(line.strip()) <= set("*=-~^#")))
             for p in text.split("\n\n")]  # a heading's underline is no text
    # doctest sessions and ruled tables are code, not prose
    return "\n\n".join(p for p in paras if p and not p.startswith(">>>") and "----" not in p)


@cache
def python_docs(min_chars: int = 200, max_bytes: int | None = None) -> RealText:
    """The Python documentation text of this interpreter (see the module docstring), at
    most ``max_bytes`` (whole documents; None: all of it)."""
    docs: list[str] = []
    seen: set[str] = set()
    size = 0

    def add(text: str) -> bool:
        nonlocal size
        text = _normalise(text)
        if len(text) < min_chars or text in seen or not _is_prose(text):
            return True
        seen.add(text)
        docs.append(text)
        size += len(text.encode())
        return max_bytes is None or size < max_bytes

    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation topics
        topics = {}
    going = all(add(topics[k]) for k in sorted(topics))
    if going:
        for path in _stdlib_files():
            if not all(add(d) for d in _docstrings(path)):
                break
    if not docs:
        raise RuntimeError("this Python ships no documentation text (pydoc_data and the "
                           "standard library's docstrings are missing)")
    v = sys.version_info
    return RealText(tuple(docs), f"CPython {v.major}.{v.minor} documentation (pydoc_data "
                                 "topics and standard-library docstrings)")


def concatenated(parts: Sequence[RealText]) -> RealText:
    """Several texts as one (documents in order)."""
    return RealText(tuple(d for p in parts for d in p.documents),
                    " + ".join(p.source for p in parts))
