"""One exception type for everything a user can get wrong.

The CLI prints ``error: <message>`` on one line and exits non-zero for any
:class:`GaugefixError`; the API raises it unchanged.
"""

from __future__ import annotations


class GaugefixError(ValueError):
    """Bad input: a malformed gauge, an unknown family or key, a width mismatch, ..."""
