"""gaugefix: the residual-stream gauge of transformer checkpoints, fixed and transported.

Convention: a gauge maps chart A to chart B, ``x_B = Q x_A``, stored as
``perm, sign`` with ``x_B[i] = sign[i] * x_A[perm[i]]``.

Each job of the command line is one call in :mod:`gaugefix.jobs`; the names below are
imported on first use, so that ``import gaugefix`` (and the console script's start) stays
light.
"""

import importlib  # no other import here: the console script's start waits on this module

__version__ = "0.1.0"

_LAZY = {
    "Family": "arch", "Op": "arch", "detect_family": "arch", "families": "arch",
    "get_family": "arch", "GaugefixError": "errors", "SignedPerm": "group",
    "gauge_checkpoint": "apply", "gauge_model": "apply", "gauge_state_dict": "apply",
    "Model": "model", "open_model": "model",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gaugefix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
