"""Coordinate sets and attribution lists: top-k residual coordinates, with scores.

Formats: JSON (a list of entries, or an object whose ``entries`` / ``neurons`` /
``coordinates`` key holds that list; other keys are kept) or CSV with a header.
An entry has ``index`` and optionally ``score``, ``layer`` and any other fields.

Coordinate j of A is coordinate i = perm⁻¹[j] of B, and ``x_B[i] = s · x_A[j]``
with s = sign[i]. So the index is mapped, a signed score is multiplied by s, and
each entry carries ``gauge_sign`` — the sign relating it to its original chart
(composed when transported again) — so that "activates positively on X" stays
true: it now reads "``gauge_sign · x_B[i]`` activates positively". When every
entry's ``gauge_sign`` is +1 the field is omitted, so a round trip restores the
original entries exactly.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_write_text, read_json, read_text
from .base import check_suffix, no_record

LIST_KEYS = ("entries", "neurons", "coordinates")
SIGN_FIELD = "gauge_sign"


_INT_TEXT = re.compile(r"[+-]?\d+")


def _integer(value: Any, what: str) -> int:
    """A JSON integer or, from CSV, integer text; never a bool, 3.7 or "x"."""
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GaugefixError(f"neurons: {what} must be an integer, got {value!r}")
    return value


def transport_entries(entries: list[dict[str, Any]], gauge: SignedPerm) -> list[dict[str, Any]]:
    if not entries:
        return []
    out = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "index" not in e:
            raise GaugefixError(f"neurons: entry {n} has no 'index' field")
        j = _integer(e["index"], f"entry {n}'s index")
        if not 0 <= j < gauge.d:
            raise GaugefixError(f"width mismatch: neurons entry {n} has index {j}, the gauge "
                                f"has d={gauge.d} (indices 0..{gauge.d - 1})")
        prior = _integer(e.get(SIGN_FIELD, 1), f"entry {n}'s {SIGN_FIELD}")
        if prior not in (1, -1):
            raise GaugefixError(f"neurons: entry {n}'s {SIGN_FIELD} must be 1 or -1, got "
                                f"{e[SIGN_FIELD]!r}")
        (i,), (s,) = gauge.index_map([j])
        new = dict(e)
        new["index"] = int(i) if not isinstance(e["index"], str) else str(int(i))
        if "score" in e and e["score"] not in (None, ""):
            new["score"] = _signed(e["score"], int(s), n)
        new[SIGN_FIELD] = prior * int(s)
        out.append(new)
    if all(e[SIGN_FIELD] == 1 for e in out):
        for e in out:
            del e[SIGN_FIELD]
    return out


def _signed(score: Any, s: int, n: int) -> Any:
    if isinstance(score, int | float) and not isinstance(score, bool):
        return score * s if s < 0 else score
    if not isinstance(score, str):
        raise GaugefixError(f"neurons: entry {n}'s score must be a number, got {score!r}")
    text = score.strip()  # CSV: keep the exact decimal text, flip its sign
    try:
        float(text)
    except ValueError:
        raise GaugefixError(f"neurons: entry {n}'s score must be a number, got {score!r}"
                            ) from None
    if s > 0:
        return score
    if text.startswith("-"):
        return text[1:]
    return "-" + (text[1:] if text.startswith("+") else text)


def transport_neurons(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                      record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    src, dst = Path(src), Path(dst)
    if src.suffix not in (".json", ".csv", ".tsv"):
        raise GaugefixError(f"neurons: unknown file type {src.suffix!r} ({src}); expected "
                            ".json, .csv or .tsv")
    check_suffix(dst, {".json": "JSON", ".csv": "CSV", ".tsv": "TSV"}[src.suffix],
                 (src.suffix,))
    no_record(record, "a neuron list")
    if src.suffix == ".json":
        doc = read_json(src, "neuron list", expect=(list, dict))
        if isinstance(doc, list):
            entries = transport_entries(doc, gauge)
            result: Any = entries
        else:
            key = next((k for k in LIST_KEYS if isinstance(doc.get(k), list)), None)
            if key is None:
                raise GaugefixError(f"{src}: expected a list of entries or an object with one "
                                    f"of {', '.join(LIST_KEYS)}")
            entries = transport_entries(doc[key], gauge)
            result = {**doc, key: entries}
        atomic_write_text(dst, json.dumps(result, indent=2) + "\n", overwrite=overwrite,
                          inputs=(src,))
    else:
        delim = "\t" if src.suffix == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(read_text(src, "neuron list")), delimiter=delim)
        if reader.fieldnames is None or "index" not in reader.fieldnames:
            raise GaugefixError(f"{src}: a CSV of neurons needs an 'index' column")
        rows = list(reader)
        ragged = next((n for n, r in enumerate(rows, start=2) if None in r), None)
        if ragged is not None:
            raise GaugefixError(f"{src}: line {ragged} has more fields than the header")
        entries = transport_entries(rows, gauge)
        fields = list(reader.fieldnames)
        if entries and SIGN_FIELD in entries[0] and SIGN_FIELD not in fields:
            fields.append(SIGN_FIELD)
        elif entries and SIGN_FIELD not in entries[0] and SIGN_FIELD in fields:
            fields.remove(SIGN_FIELD)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, delimiter=delim, lineterminator="\n")
        writer.writeheader()
        writer.writerows(entries)
        atomic_write_text(dst, buf.getvalue(), overwrite=overwrite, inputs=(src,))
    return {"entries": len(entries)}
