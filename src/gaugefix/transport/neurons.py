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
from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_write_text

LIST_KEYS = ("entries", "neurons", "coordinates")
SIGN_FIELD = "gauge_sign"


def transport_entries(entries: list[dict[str, Any]], gauge: SignedPerm) -> list[dict[str, Any]]:
    if not entries:
        return []
    out = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "index" not in e:
            raise GaugefixError(f"neurons: entry {n} has no 'index' field")
        try:
            j = int(e["index"])
        except (TypeError, ValueError):
            raise GaugefixError(f"neurons: entry {n} has a non-integer index {e['index']!r}"
                                ) from None
        if not 0 <= j < gauge.d:
            raise GaugefixError(f"width mismatch: neurons entry {n} has index {j}, the gauge "
                                f"has d={gauge.d}")
        (i,), (s,) = gauge.index_map([j])
        new = dict(e)
        new["index"] = int(i)
        if "score" in e and e["score"] not in (None, ""):
            new["score"] = _signed(e["score"], int(s))
        new[SIGN_FIELD] = int(e.get(SIGN_FIELD, 1)) * int(s)
        out.append(new)
    if all(e[SIGN_FIELD] == 1 for e in out):
        for e in out:
            del e[SIGN_FIELD]
    return out


def _signed(score: Any, s: int) -> Any:
    if isinstance(score, bool):
        raise GaugefixError("neurons: a boolean score cannot carry a sign")
    if isinstance(score, int | float):
        return score * s if s < 0 else score
    text = str(score)  # CSV: keep the exact decimal text, flip its sign
    float(text)
    if s > 0:
        return text
    if text.startswith("-"):
        return text[1:]
    return "-" + (text[1:] if text.startswith("+") else text)


def transport_neurons(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                      record: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise GaugefixError(f"neurons file not found: {src}")
    text = src.read_text()
    if src.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GaugefixError(f"{src}: not valid JSON ({exc})") from None
        if isinstance(doc, list):
            entries, out_doc = transport_entries(doc, gauge), None
            result: Any = entries
        elif isinstance(doc, dict):
            key = next((k for k in LIST_KEYS if isinstance(doc.get(k), list)), None)
            if key is None:
                raise GaugefixError(f"{src}: expected a list of entries or an object with one "
                                    f"of {', '.join(LIST_KEYS)}")
            entries = transport_entries(doc[key], gauge)
            out_doc = {**doc, key: entries}
            result = out_doc
        else:
            raise GaugefixError(f"{src}: expected a JSON list or object of neuron entries")
        atomic_write_text(dst, json.dumps(result, indent=2) + "\n", overwrite=overwrite)
    elif src.suffix in (".csv", ".tsv"):
        delim = "\t" if src.suffix == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text), delimiter=delim)
        if reader.fieldnames is None or "index" not in reader.fieldnames:
            raise GaugefixError(f"{src}: a CSV of neurons needs an 'index' column")
        entries = transport_entries(list(reader), gauge)
        fields = list(reader.fieldnames)
        if entries and SIGN_FIELD in entries[0] and SIGN_FIELD not in fields:
            fields.append(SIGN_FIELD)
        elif entries and SIGN_FIELD not in entries[0] and SIGN_FIELD in fields:
            fields.remove(SIGN_FIELD)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, delimiter=delim, lineterminator="\n")
        writer.writeheader()
        writer.writerows(entries)
        atomic_write_text(dst, buf.getvalue(), overwrite=overwrite)
    else:
        raise GaugefixError(f"neurons: unknown file type {src.suffix!r}; expected .json or .csv")
    return {"entries": len(entries)}
