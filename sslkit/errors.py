"""The one exception for bad input: a missing dataset, a corrupt image, a bad config value, a
damaged checkpoint. The command line prints it as one ``sslkit: error:`` line; anything else is
a bug and keeps its traceback.

``UserError`` is a ``ValueError``: code that calls sslkit as a library (a loss given an impossible
setting, lightly-style ``except ValueError``) catches it where Python's convention says it should."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, with a message that says what was wrong and what to do about it."""
