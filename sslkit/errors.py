"""The one exception for bad input: a missing dataset, a corrupt image, a bad config value, a
damaged checkpoint. The command line prints it as one ``sslkit: error:`` line; anything else is
a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, with a message that says what was wrong and what to do about it."""
