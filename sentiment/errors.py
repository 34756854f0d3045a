"""The exception types for mistakes a user can fix.

Anything raised as `SentimentError` is the user's input at fault (a missing file, a column
that is not there, too few rows); the command-line entry points print its message on one line
and exit with status 2. Every other exception is a bug and keeps its traceback.

`SettingError` is a bad value of one named setting, said in neutral words by the library
(`max_length: 1024 is over …`); each front end names the setting its own way: the command
line as its flag (`--max-length`), the service as its variable (`SENTIMENT_MAX_LENGTH`).
"""

import sys
from contextlib import contextmanager


def n_rows(count):
    """'1 row', '2,000 rows': a count of rows in a message."""
    return f"{count:,} row{'' if count == 1 else 's'}"


def flag(name):
    """The command-line flag of a setting: `max_length` is `--max-length`."""
    return "--" + name.replace("_", "-")


class SentimentError(Exception):
    """Bad input, described in words that say what to change."""


class SettingError(SentimentError):
    """A bad value for the setting `name` (a field name such as 'max_length')."""

    def __init__(self, name, message):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message

    def as_flag(self):
        return f"{flag(self.name)}: {self.message}"

    def as_variable(self):
        return f"SENTIMENT_{self.name.upper()}: {self.message}"


@contextmanager
def exit_on_user_error():
    """Turn a `SentimentError` into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except SettingError as err:
        print(f"error: {err.as_flag()}", file=sys.stderr)
        raise SystemExit(2) from None
    except SentimentError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
