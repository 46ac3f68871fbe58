"""The one error type of `sftlab eval` for things a user can fix (a missing file, a bad suite row)."""

from __future__ import annotations

from sftlab.errors import SftlabError


class EvalError(SftlabError, ValueError):
    """A user error in an evaluation: the message says what is wrong and what to do."""
