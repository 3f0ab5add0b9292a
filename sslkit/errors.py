"""The one exception for bad input: a missing dataset, a corrupt image, a bad config value, a
damaged checkpoint. The command line prints it as one ``sslkit: error:`` line; anything else is
a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, with a message that says what was wrong and what to do about it."""


class ArgumentError(UserError, ValueError):
    """An impossible argument or input given to a part used as a library (a loss, a memory bank):
    also a ``ValueError``, Python's convention for a bad argument and what lightly's losses raise,
    so code written for them catches it alike. (Not a ``ValueError`` in general: pydantic turns a
    ValueError raised in a config validator into its own error, and a ``UserError`` there must
    pass through whole.)"""
