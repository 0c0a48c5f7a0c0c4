"""The ``gaugefix`` console script: a signal that arrives while Python is still importing
gaugefix, transformers or torch prints one line instead of a traceback."""

from __future__ import annotations

import os
import signal
import sys

_SIGNALS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]


def _starting(signum: int, frame: object) -> None:
    sys.stderr.write(f"error: interrupted by {signal.Signals(signum).name} while starting; "
                     "nothing was written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    for s in _SIGNALS:
        signal.signal(s, _starting)
    from .cli import main as run

    # imported: from here on Ctrl-C unwinds (and each command installs its own handlers)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in _SIGNALS[1:]:
        signal.signal(s, signal.SIG_DFL)
    run()
