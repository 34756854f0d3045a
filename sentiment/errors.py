"""The one exception type for mistakes a user can fix.

Anything raised as `SentimentError` is the user's input at fault (a missing file, a column
that is not there, too few rows); the command-line entry points print its message on one line
and exit with status 2. Every other exception is a bug and keeps its traceback.
"""

import sys
from contextlib import contextmanager


class SentimentError(Exception):
    """Bad input, described in words that say what to change."""


@contextmanager
def exit_on_user_error():
    """Turn a `SentimentError` into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except SentimentError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
