"""Errors a user can act on. Importing this module is cheap (no torch), so the CLI can name
them without loading the training stack."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient norm is NaN/Inf; the message names the step and its rows."""
