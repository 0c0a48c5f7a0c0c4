"""Transport of coordinate-indexed objects between charts, in their users' own formats.

Each kind is a small adapter over the single primitive (``SignedPerm.apply``,
reached through :class:`~gaugefix.arch.Op`). ``gauge`` maps chart A to chart B;
``inverse=True`` moves objects from B back to A.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import GaugefixError
from ..group import SignedPerm
from .base import transport_record
from .lora import transport_lora
from .merge import merge_checkpoints
from .neurons import transport_entries, transport_neurons
from .optim import transport_optim
from .sae import transport_sae
from .steering import transport_steering

ADAPTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "steering": transport_steering,
    "sae": transport_sae,
    "neurons": transport_neurons,
    "lora": transport_lora,
    "optim": transport_optim,
}
KINDS = tuple(ADAPTERS)


def transport(kind: str, src: str | Path, dst: str | Path, gauge: SignedPerm, *,
              inverse: bool = False, overwrite: bool = False, gauge_file: str | None = None,
              **options: Any) -> dict[str, Any]:
    """Move the object at ``src`` (of ``kind``) into the other chart, written to ``dst``."""
    if kind not in ADAPTERS:
        raise GaugefixError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    g = gauge.inverse() if inverse else gauge
    record = transport_record(gauge, inverse, gauge_file)
    if "checkpoint" in options:  # the checkpoint it now belongs to, by fingerprint
        record["checkpoint"] = options.pop("checkpoint")
    return ADAPTERS[kind](src, dst, g, record=record, overwrite=overwrite, **options)


__all__ = ["KINDS", "merge_checkpoints", "transport", "transport_entries"]
