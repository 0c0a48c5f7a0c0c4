"""The ``gaugefix`` console script: a signal that arrives while Python is still importing
gaugefix, transformers or torch prints one line instead of a traceback.

The handlers go in when this module is imported, before anything else (``_signal``, not
``signal``, which imports ``enum``: milliseconds in which Ctrl-C would print a traceback).
What is left is the interpreter's own start, before the script's first line runs (about
20 ms, longer on a busy machine): a Ctrl-C there is Python's, a three-line traceback."""

import _signal
import os
import sys

_NAMES = {getattr(_signal, n): n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(_signal, n)}


def _starting(signum: int, frame: object) -> None:
    sys.stderr.write(f"error: interrupted by {_NAMES[signum]} while starting; nothing was "
                     "written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


# on import: the console script imports this module first, and nothing else does
for _s in _NAMES:
    _signal.signal(_s, _starting)


def main() -> None:
    from .cli import main as run

    # imported: from here on Ctrl-C unwinds (and each command installs its own handlers)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    for s in _NAMES:
        if s != _signal.SIGINT:
            _signal.signal(s, _signal.SIG_DFL)
    run()
