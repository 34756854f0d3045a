"""The exception types for mistakes a user can fix, and how their lines are said.

Anything raised as `SentimentError` is the user's input at fault (a missing file, a column
that is not there, too few rows); the command-line entry points print its message on one line
and exit with status 2. Every other exception is a bug and keeps its traceback.

`SettingError` is a bad value of one named setting, said in neutral words by the library
(`max_length: 1024 is over …`); each front end names the setting its own way: the command
line as its flag (`--max-length`), the service as its variable (`SENTIMENT_MAX_LENGTH`).

`say` writes such an error's line, and `warn` a warning's, each in one write and once per machine
for the processes of one `accelerate launch`, which all meet the same input.
"""

import hashlib
import os
import socket
import sys
from contextlib import contextmanager

_SAID = []  # the names `said_here_before` holds while this process lives


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


def said_here_before(line):
    """Whether another process of this launch on this machine has said `line` already. Every process
    of an `accelerate launch` meets the same bad input (a missing file, a bad flag), and eight GPUs
    said it eight times. The first to bind an abstract Unix socket named after the line and their
    launcher holds the name while it lives; Linux alone has such sockets, and elsewhere each says it."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) < 2 or not sys.platform.startswith("linux"):
        return False
    name = f"\0sentiment-{os.getppid()}-{hashlib.sha256(line.encode()).hexdigest()[:32]}"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(name)
    except OSError:
        sock.close()
        return True
    _SAID.append(sock)
    return False


def say(line):
    """`line` on stderr in one write, once per machine for the processes of a launch (`said_here_before`).
    Unbuffered (PYTHONUNBUFFERED, as many images set it), print() writes a line and its end apart, and
    two processes' lines ran into one."""
    line += "\n"
    stream = sys.stderr if sys.stderr is not None else sys.stdout  # None: closed by the shell (`2>&-`)
    if stream is not None and not said_here_before(line):
        stream.write(line)
        stream.flush()


def warn(message):
    """`warning: <message>`, said as `say` says it."""
    say(f"warning: {message}")


@contextmanager
def exit_on_user_error():
    """Turn a `SentimentError` into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except SettingError as err:
        say(f"error: {err.as_flag()}")
        raise SystemExit(2) from None
    except SentimentError as err:
        say(f"error: {err}")
        raise SystemExit(2) from None


def json_type(value):
    """What JSON calls the type of `value`, for a line saying a file holds the wrong one."""
    names = {dict: "object", list: "array", str: "string", bool: "true or false", type(None): "null"}
    return names.get(type(value), "number")


def repeated_key(pairs):
    """The first key given twice among the (key, value) `pairs` of one JSON object, or None. JSON allows it;
    readers differ on which value counts (Python's the last, polars and others the first)."""
    seen = set()
    return next((key for key, _ in pairs if key in seen or seen.add(key)), None)
