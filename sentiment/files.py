"""Writing files so that no crash, kill or full disk leaves half of one behind.

A file is written under a temporary name beside it (`temporary`) and renamed into place once
complete (`write_atomically` for small files); what a process killed outright (SIGKILL, the
out-of-memory killer, a power cut) left under such a name is removed by the next writer of the
same path (`remove_stale_temporaries`). `fsync_path` and `fsync_tree` put data on disk before a
rename makes it look complete; `replace_durably` is such a rename for one file. `disk_full`
recognises a write that failed for want of space, whatever library raised it.
"""

import difflib
import errno
import os
import re
import shutil
import socket
import stat

from .errors import SentimentError


def temporary(path, hidden=False):
    """A name beside `path` to write it under, this process's own. The machine's name is part of it:
    a folder may be shared between machines, and process ids only mean something on one."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{'.' if hidden else ''}{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path):
    """Remove the temporary files (and folders) of `path` left by processes of this machine that are
    gone; those of live processes, another run writing the same path, are left alone."""
    folder, name = os.path.split(os.path.abspath(path))
    own = re.compile(rf"\.?{re.escape(name)}\.tmp-{re.escape(socket.gethostname())}-(\d+)(\..*)?")
    for entry in os.listdir(folder):
        found = own.fullmatch(entry)
        if found and int(found[1]) != os.getpid() and not process_alive(int(found[1])):
            stale = os.path.join(folder, entry)
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


def remove_path(path):
    """Remove what is at `path`, if anything: a folder with all it holds, a file, or a link (never what it
    points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def write_atomically(path, text):
    """Write `text` to `path` through a temporary file beside it, renamed into place once complete:
    a crash leaves the old file or the new one, never half of one. A link is written through, as
    `>` writes: the file it points to is replaced, and the link stays."""
    path = os.path.realpath(path)
    remove_stale_temporaries(path)
    tmp = temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# What fsync says on a file system that cannot flush a directory (CIFS shares, some FUSE mounts and
# Ceph volumes); writeback errors are EIO, ENOSPC or EDQUOT, never these.
CANNOT_FLUSH = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def fsync_path(path):
    """Flush a file or a folder to disk. A folder its file system cannot flush is left as it is: its
    renames are as durable as that file system makes them, and the file they name is flushed already."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in CANNOT_FLUSH or not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise
    finally:
        os.close(fd)


def replace_durably(tmp, path):
    """Rename the complete file `tmp` onto `path`, its bytes on disk first and the rename after it. A
    rename reaches the disk before the data it names: without the first fsync a power cut soon after
    can leave `path` empty, and the old file it replaced gone with it. The new file takes the old
    one's permissions, as `>` keeps them: results made private stay private."""
    if os.path.exists(path):
        shutil.copymode(path, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def fsync_tree(folder):
    """Flush every file of `folder` and the folders themselves: a power cut must not leave empty files."""
    for parent, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(parent, name))
        fsync_path(parent)


def did_you_mean(path, folder=False):
    """For a file (or `folder`) that is not there: ' (did you mean X?)' naming the closest one beside
    where it would be, or '' when none is close."""
    path = str(path).rstrip("/")
    parent = os.path.dirname(path)
    try:
        names = [entry.name for entry in os.scandir(parent or ".") if entry.is_dir() == folder]
    except OSError:
        return ""
    close = difflib.get_close_matches(os.path.basename(path), names, n=1)
    return f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""


def umask():
    """This process's umask, read without setting it (os.umask can only read it by changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def as_plain_files(paths):
    """Give `paths` the mode a plainly written file gets (0666 less the umask). safetensors 0.8 writes
    its files owner-only whatever the umask: a service running as another user, or a teammate
    resuming a run, could read every file of a model folder or checkpoint but its weights."""
    mode = 0o666 & ~umask()
    for path in paths:
        os.chmod(path, mode)


def disk_full_error(folder, err, then):
    """The one line a command ends with when a write found `folder`'s disk full; `then` says how to go on."""
    return SentimentError(f"the disk of {folder} is full ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:120]}); free some space, then {then}")


def disk_full(err):
    """Whether `err` is a write that failed for want of space, whatever raised it: torch's writer says
    only 'file write failed'; polars raises an OSError without an errno, or a ComputeError, whose
    message holds the system's words."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return (any(words in str(err) for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))
            or isinstance(err, RuntimeError) and "write failed" in str(err))
