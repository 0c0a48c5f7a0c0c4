"""One exception type for everything a user can get wrong, and one warning type.

The CLI prints ``error: <message>`` on one line and exits 2 for any
:class:`GaugefixError`, and ``warning: <message>`` for a :class:`GaugefixWarning`;
the API raises and warns with them unchanged.
"""

from __future__ import annotations


class GaugefixError(ValueError):
    """Bad input: a malformed gauge, an unknown family or key, a width mismatch, ..."""


class GaugefixWarning(UserWarning):
    """Something the user should know that does not stop the command."""
