"""gaugefix: the residual-stream gauge of transformer checkpoints, fixed and transported.

Convention: a gauge maps chart A to chart B, ``x_B = Q x_A``, stored as
``perm, sign`` with ``x_B[i] = sign[i] * x_A[perm[i]]``.
"""

from .apply import gauge_checkpoint, gauge_model, gauge_state_dict
from .arch import Family, Op, detect_family, families, get_family
from .errors import GaugefixError
from .group import SignedPerm

__version__ = "0.1.0"

__all__ = [
    "Family",
    "GaugefixError",
    "Op",
    "SignedPerm",
    "detect_family",
    "families",
    "gauge_checkpoint",
    "gauge_model",
    "gauge_state_dict",
    "get_family",
]
