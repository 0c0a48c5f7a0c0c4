"""The string of each token id, read from what a model ships with its weights.

Identity across vocabularies keys embedding rows by token string, not by id, so that a model
whose vocabulary was cut, extended or reordered still meets its base on the tokens they share
(as AWM does). Read from:

* a GGUF file: its ``tokenizer.ggml.tokens`` array;
* a checkpoint directory: ``tokenizer.json`` (the ``tokenizers`` library's file: the model's
  vocabulary, a map for BPE / WordPiece / WordLevel or a list of pieces for Unigram, and the
  added tokens), else a GPT-2-style ``vocab.json``.

Only the vocabulary is read (as JSON): a tokenizer whose merges no longer fit its vocabulary
— a cut vocabulary — still names its tokens. A model with none of these has no strings
(:func:`token_strings` returns None) and its tokens are keyed by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import GaugefixError

# the largest tokenizer file read (a vocabulary of millions of tokens is well under this)
MAX_TOKENIZER_BYTES = 256 << 20


def token_strings(model: Any) -> list[str | None] | None:
    """``strings[i]``: token id i's string (None for an id the tokenizer does not name), for
    ids 0..vocab_size-1; None when the model ships no tokenizer this module reads."""
    vocab: dict[int, str] | None = None
    if getattr(model, "gguf", None) is not None:
        vocab = _gguf_tokens(model.gguf.reader)
    elif getattr(model, "path", None) is not None and Path(model.path).is_dir():
        vocab = _directory_tokens(Path(model.path))
    if not vocab:
        return None
    n = max(model.vocab_size, max(vocab) + 1)
    out: list[str | None] = [None] * n
    for i, s in vocab.items():
        if 0 <= i < n:
            out[i] = s
    return out


def _gguf_tokens(reader: Any) -> dict[int, str] | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    return {i: bytes(field.parts[j]).decode("utf-8", "replace")
            for i, j in enumerate(field.data)}


def _read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise GaugefixError(f"{path}: {path.stat().st_size} bytes, more than the "
                            f"{MAX_TOKENIZER_BYTES >> 20} MiB a tokenizer file may have")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GaugefixError(f"{path}: not a JSON tokenizer file ({e})") from None


def _directory_tokens(folder: Path) -> dict[int, str] | None:
    out: dict[int, str] = {}
    if (folder / "tokenizer.json").is_file():
        doc = _read_json(folder / "tokenizer.json")
        vocab = (doc.get("model") or {}).get("vocab") if isinstance(doc, dict) else None
        if isinstance(vocab, dict):
            out.update((i, s) for s, i in vocab.items() if isinstance(i, int))
        elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
            out.update((i, p[0]) for i, p in enumerate(vocab)
                       if isinstance(p, list) and p and isinstance(p[0], str))
        for added in doc.get("added_tokens") or () if isinstance(doc, dict) else ():
            if isinstance(added, dict) and isinstance(added.get("id"), int):
                out[added["id"]] = str(added.get("content"))
    elif (folder / "vocab.json").is_file():
        vocab = _read_json(folder / "vocab.json")
        if isinstance(vocab, dict):
            out.update((i, s) for s, i in vocab.items() if isinstance(i, int))
    return out or None
