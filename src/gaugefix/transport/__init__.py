"""Transport of coordinate-indexed objects between charts, in their users' own formats.

Each kind is a small adapter over the single primitive (``SignedPerm.apply``,
reached through :class:`~gaugefix.arch.Op`). ``gauge`` maps chart A to chart B;
``inverse=True`` moves objects from B back to A. A crosscoder reads several residual
streams: its ``gauge`` may be a sequence with one gauge per slot (``None``: unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from ..registry import MERGE_METHODS, TRANSPORT_KINDS, check_options, transport_kind
from .base import transport_record
from .merge import merge_checkpoints
from .neurons import transport_entries

KINDS = tuple(TRANSPORT_KINDS)


def transport(kind: str, src: str | Path, dst: str | Path,
              gauge: SignedPerm | Sequence[SignedPerm | None], *, inverse: bool = False,
              overwrite: bool = False, gauge_file: str | None = None,
              **options: Any) -> dict[str, Any]:
    """Move the object at ``src`` (of ``kind``) into the other chart, written to ``dst``."""
    spec = transport_kind(kind)
    check_options(spec, {k: v for k, v in options.items() if k != "checkpoint"})
    g: SignedPerm | list[SignedPerm | None]
    if isinstance(gauge, SignedPerm):
        g = gauge.inverse() if inverse else gauge
        record = transport_record(gauge, inverse, gauge_file)
    else:
        if not spec.per_slot:
            per_slot = [k.name for k in TRANSPORT_KINDS.values() if k.per_slot]
            raise GaugefixError(f"{kind} takes one gauge; one gauge per slot goes with "
                                f"{', '.join(per_slot)}")
        slots = list(gauge)
        if not all(s is None or isinstance(s, SignedPerm) for s in slots):
            raise GaugefixError("per-slot gauges must each be a SignedPerm or None")
        g = [s.inverse() if inverse and s is not None else s for s in slots]
        record = {"tool": "gaugefix", "gauge_file": gauge_file,
                  "direction": "B->A" if inverse else "A->B",
                  "slots": [None if s is None else transport_record(s, inverse, None)
                            for s in slots]}
    if "checkpoint" in options:  # the checkpoint it now belongs to, by fingerprint
        record["checkpoint"] = options.pop("checkpoint")
    return spec.adapter()(src, dst, g, record=record, overwrite=overwrite, **options)


__all__ = ["KINDS", "MERGE_METHODS", "TRANSPORT_KINDS", "merge_checkpoints", "transport",
           "transport_entries"]
