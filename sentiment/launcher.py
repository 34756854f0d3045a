"""Runs under `accelerate launch`: signals sent to the launcher reach them, and they end cleanly.

With one process, `accelerate launch` runs `train.py` or `infer.py` as its child and, when it is
itself sent SIGTERM (`kill`, supervisord, a job manager that signals one process), dies without
passing it on (before 1.16; 1.16 passes it on) or is killed outright: the run went on unseen, to be
killed later without a checkpoint. On Linux the child asks the kernel for SIGTERM when that
launcher dies, and stops as SIGTERM makes it stop.
With several processes torchrun passes signals on itself.

With several processes, the process group must be gone before the interpreter shuts down: a gloo
thread still running then, dropping its last collective's tensor, aborts a run whose work is done
(SIGABRT, and the launcher reports a failure). `free_the_group_at_the_end` sees that destroying it frees it.
When one process stops on an error the others do not meet, `peer_gone` is what the others say.

What stops a run may also end what reads its output: a terminal that closes, and with it the
launcher (which from Accelerate 1.16 reads the run's standard error through a pipe); Ctrl-C
ends a `| tee log` too. A write there then fails, and would end the run before it stops as asked:
`outliving_their_readers` has such writes go to /dev/null.
"""

import contextlib
import ctypes
import errno
import os
import signal
import sys

from .errors import SentimentError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
followed = None  # the process id of the launcher whose death sends SIGTERM, once asked for
# What a collective raises (gloo) in a process whose peer has gone: after a full disk where only the main
# process writes, say. Its traceback only hides the peer's own error.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def stop_signals():
    """The signals that stop a run: Ctrl-C, SIGTERM and a closed terminal's SIGHUP, but not under nohup,
    where a hang-up is not a stop."""
    stops = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stops.append(signal.SIGHUP)
    return stops


def launched_by_accelerate(command):
    """Whether `command` (a process's arguments) is `accelerate launch …`, `accelerate-launch …` or
    `python -m accelerate.commands.launch …`."""
    head = [os.path.basename(part) for part in command[:4]]
    return ("accelerate.commands.launch" in head or "accelerate-launch" in head
            or ("accelerate", "launch") in zip(head, head[1:]))


def command_of(pid):
    """A process's arguments; empty where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def stop_with_the_launcher():
    """When the parent is accelerate's one-process launcher, have its death send this process SIGTERM."""
    global followed
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    parent = os.getppid()
    if not launched_by_accelerate(command_of(parent)):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return  # not allowed here (a seccomp profile, say): the run goes on as before
    followed = parent
    if os.getppid() != parent:  # the launcher died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)


def launcher_gone():
    """Whether the launcher this process follows has died. Its SIGTERM is then no one's second request
    to stop at once: Ctrl-C reaches the launcher too, which dies of it a moment later, and once it is
    gone the shell has the terminal back, so no further Ctrl-C can reach this process."""
    return followed is not None and os.getppid() != followed


def free_the_group_at_the_end():
    """Call before the process group is made. torch.distributed.nn's functions keep `group.WORLD`, read
    when the module is first imported, as a default argument; transformers imports it while loading a
    model (through torch.distributed.fsdp), after the group exists, and the group then outlives
    `destroy_process_group`, its threads with it. Imported now, before the group, the default is None."""
    import torch.distributed
    if torch.distributed.is_available():  # a torch built without it makes no group either
        import torch.distributed.nn  # noqa: F401


def peer_gone(err):
    """The one-line error for a process of several whose collective failed (`err`) because another process
    of the run ended; None for any other error."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or not isinstance(err, RuntimeError):
        return None  # an OSError's "Broken pipe" is a closed standard output
    if not any(words in str(err) for words in PEER_GONE):
        return None
    return SentimentError(f"process {os.environ.get('RANK', '?')}: another process of this run ended (its own "
                          f"output says why, unless it was killed outright), so this one stops too")


class OutlivesItsReader:
    """A text stream whose writes do not fail for want of a reader: where its pipe's reader has gone
    (EPIPE) or its terminal has hung up (EIO), its descriptor is pointed at /dev/null, and what was
    written goes there."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return self.tolerant(self.stream.write, text)

    def flush(self):
        return self.tolerant(self.stream.flush)

    def tolerant(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.EIO):
                raise
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, self.stream.fileno())
        os.close(quiet)
        return call(*args)  # the text still buffered, with this, goes to /dev/null

    def __getattr__(self, name):  # encoding, fileno, isatty, …: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def outliving_their_readers(*names):
    """Standard streams (`"stdout"`, `"stderr"`) as `OutlivesItsReader` while the block runs. Progress bars
    made in it write through them."""
    previous = {name: getattr(sys, name) for name in names}
    for name, stream in previous.items():
        if stream is not None:  # None: closed by the shell (`>&-`)
            setattr(sys, name, OutlivesItsReader(stream))
    try:
        yield
    finally:
        for name, stream in previous.items():
            setattr(sys, name, stream)
