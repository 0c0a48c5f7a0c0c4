"""The gauge file: a ``SignedPerm`` as JSON, and reading and writing it.

    {"format": "gaugefix.gauge/2", "convention": "x_B[i] = sign[i] * x_A[perm[i]]",
     "d": 4, "perm": [2, 0, 3, 1], "sign": [1, -1, 1, 1], ...metadata}

Format 2 names a checkpoint (the ``source`` and ``target`` metadata) by the BLAKE3 of its
weight files (``blake3``); format 1, whose files are still read, by their sha256
(``sha256``). The gauge itself is written the same way in both. :func:`same_chart` compares
two such identities by whichever hashes both record.

``from_json`` checks only the document's shape: the format tag and convention, the fields'
presence and JSON types, their lengths against ``d``, and what JSON allows but an int64 array
cannot hold or would misread (unbounded integers, floats as indices, booleans). Whether
``perm``/``sign`` make a group element is ``SignedPerm``'s to say; its error comes back here
prefixed with the file's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GaugefixError
from .io import atomic_write_text, read_json

if TYPE_CHECKING:  # the class comes from its caller: group imports this module, not back
    from .group import SignedPerm

GAUGE_FORMAT = "gaugefix.gauge/2"
FORMATS = ("gaugefix.gauge/1", GAUGE_FORMAT)  # what is read
# the content hashes a chart's identity may record: format 2's, then format 1's
IDENTITY_HASHES = ("blake3", "sha256")
CONVENTION = "x_B[i] = sign[i] * x_A[perm[i]]"

_INT64 = range(-(2**63), 2**63)


def _is_int(v: Any) -> bool:
    """A JSON integer (Python's ``bool`` is an ``int`` too)."""
    return isinstance(v, int) and not isinstance(v, bool)


def to_json(gauge: SignedPerm, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": GAUGE_FORMAT,
        "convention": CONVENTION,
        "d": gauge.d,
        "perm": gauge.perm.tolist(),
        "sign": gauge.sign.astype(int).tolist(),
    }
    if metadata:
        clash = set(metadata) & set(doc)
        if clash:
            raise GaugefixError(f"metadata may not override {sorted(clash)}")
        doc.update(metadata)
    return doc


def from_json(cls: type[SignedPerm], doc: Any, source: str = "gauge") -> SignedPerm:
    """The gauge (a ``cls``) in a parsed gauge document; errors name ``source``."""
    if not isinstance(doc, dict):
        raise GaugefixError(f"{source}: a gauge file must hold a JSON object")
    if doc.get("format") not in FORMATS:
        raise GaugefixError(
            f"{source}: not a gauge file (format is {doc.get('format')!r}, "
            f"expected one of {', '.join(map(repr, FORMATS))})"
        )
    if doc.get("convention") != CONVENTION:
        raise GaugefixError(
            f"{source}: unknown convention {doc.get('convention')!r}; expected {CONVENTION!r}"
        )
    for key in ("d", "perm", "sign"):
        if key not in doc:
            raise GaugefixError(f"{source}: missing field {key!r}")
    d, perm, sign = doc["d"], doc["perm"], doc["sign"]
    if not _is_int(d):
        raise GaugefixError(f"{source}: d must be an integer")
    if not isinstance(perm, list) or not isinstance(sign, list):
        raise GaugefixError(f"{source}: perm and sign must be JSON lists")
    if len(perm) != d or len(sign) != d:
        raise GaugefixError(
            f"{source}: d={d} but perm has {len(perm)} and sign {len(sign)} entries"
        )
    # JSON integers are unbounded: one that int64 cannot hold is no index of any width.
    bad = next((v for v in perm if not _is_int(v) or v not in _INT64), None)
    if bad is not None:
        raise GaugefixError(f"{source}: perm entries must be integers in 0..{d - 1}, found "
                            f"{bad!r}")
    # a sign field holds the JSON numbers 1 and -1 (1.0 has always passed); true is 1 to
    # numpy, so it is refused here, with any other value, in the words of the format
    bad = next((v for v in sign if isinstance(v, bool) or v not in (1, -1)), None)
    if bad is not None:
        raise GaugefixError(f"{source}: sign entries must be +1 or -1, found {bad!r}")
    try:
        gauge = cls(np.array(perm, dtype=np.int64), np.array(sign, dtype=np.int64))
    except GaugefixError as exc:  # d = 0, or perm not a permutation of 0..d-1
        raise GaugefixError(f"{source}: {exc}") from None
    conf = doc.get("confidence")
    if conf is not None and (not isinstance(conf, list) or len(conf) != d or not all(
            isinstance(c, int | float) and not isinstance(c, bool) for c in conf)):
        raise GaugefixError(f"{source}: confidence must be a list of d={d} numbers")
    return gauge


def hashes_of(identity: Any) -> list[str]:
    """The content hashes a recorded chart identity holds (of :data:`IDENTITY_HASHES`)."""
    return [k for k in IDENTITY_HASHES if isinstance(identity, dict) and identity.get(k)]


def same_chart(a: Any, b: Any) -> tuple[bool | None, str]:
    """Whether two recorded chart identities (a gauge file's ``source`` or ``target``) name
    the same checkpoint, and by what: every content hash both record (``"blake3"``,
    ``"sha256"``, ``"blake3+sha256"``), else their names (``"name"``); ``None`` (and
    ``""``) where they do not say."""
    common = [k for k in hashes_of(a) if k in hashes_of(b)]
    if common:
        return all(a[k] == b[k] for k in common), "+".join(common)
    if isinstance(a, dict) and isinstance(b, dict) and a.get("name") and b.get("name"):
        return a["name"] == b["name"], "name"
    return None, ""


def read(cls: type[SignedPerm], path: str | os.PathLike[str]
         ) -> tuple[dict[str, Any], SignedPerm]:
    """A gauge file's raw JSON (gauge plus metadata) and its gauge, with clear errors."""
    p = Path(path)
    doc = read_json(p, "gauge file", expect=None)
    return doc, from_json(cls, doc, source=str(p))


def save(gauge: SignedPerm, path: str | os.PathLike[str],
         metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    return atomic_write_text(
        Path(path), json.dumps(to_json(gauge, metadata), indent=None) + "\n",
        overwrite=overwrite,
    )
