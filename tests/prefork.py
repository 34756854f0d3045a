"""The project's scripts run by the tests from a process that imported torch and transformers once.

`python infer.py …` spends about 4 of its 5 seconds on a small model importing torch and
transformers, and the suite starts hundreds of such runs. `run` forks each one instead from a
waiting process that did those imports once (started by `start` at the beginning of the session).
The run still has a process of its own, its own arguments, environment, working folder and
standard streams, and exits (handlers, exit code, signal) as a fresh interpreter would.

What a fork cannot give a run is anything read while torch and transformers were imported:
variables such as OMP_NUM_THREADS, HF_HOME, PYTHONPATH or TRANSFORMERS_VERBOSITY. So a run whose
environment differs from the waiting process's in any variable but those below, or that is not
`python SCRIPT.py`, starts a fresh interpreter as usual (`None` from `run`).

    python tests/prefork.py FD ALIVE    # the waiting process: serves the listening socket FD
                                        # until the pipe ALIVE ends
"""

import builtins
import io
import json
import locale
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import types

# Read by the project's own modules or by the tokenizers at run time, never at import: a run may differ in them.
# The last two are set in the tests' own process by libraries the tests use there (polars' allocator, read
# when polars loads, which the waiting process never does; inductor's cache, read when it compiles)
RUN_TIME = ("SENTIMENT_", "PYTEST_", "TOKENIZERS_PARALLELISM", "_RJEM_MALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR")

_server = {}  # the waiting process, its address and environment, once started


def start(env):
    """Start the waiting process with `env`; it imports in the background while the tests run."""
    address = f"\0sentiment-tests-{os.getpid()}-{id(env)}"  # abstract: nothing to clean up on disk
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    # A pipe this process never writes to: its end tells the waiting process that the tests have gone
    # (a worker killed, pytest stopped), so it is never left behind holding its memory
    alive, held = os.pipe()
    process = subprocess.Popen([sys.executable, __file__, str(listener.fileno()), str(alive)],
                               pass_fds=[listener.fileno(), alive], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL)
    listener.close()  # the waiting process holds it now: if it dies, connecting fails and runs start fresh
    os.close(alive)
    _server.update(process=process, address=address, env=dict(env), held=held)


def stop():
    if _server:
        _server["process"].kill()
        _server["process"].wait()
        os.close(_server["held"])
        _server.clear()


def forkable(command, env):
    """Whether `command` (argv with this interpreter first) under `env` can be forked from the waiting process."""
    if not _server or len(command) < 2 or not command[1].endswith(".py") or command[0] != sys.executable:
        return False
    base = _server["env"]
    return all(key.startswith(RUN_TIME) for key in set(env) ^ set(base) | {k for k in env if env[k] != base.get(k)})


def run(command, cwd, env, input=None, timeout=None):
    """`subprocess.run(command, cwd=cwd, env=env, input=input, timeout=timeout, capture_output=True, text=True)`,
    forked from the waiting process; None where that cannot be done (then start it as usual)."""
    if not forkable(command, env):
        return None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(_server["address"])
    except OSError:  # the waiting process has gone
        client.close()
        return None
    encoding = locale.getpreferredencoding(False)  # what subprocess.run(text=True) decodes with
    stdin_r, stdin_w = os.pipe() if input is not None else (os.dup(0), None)
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    request = json.dumps({"argv": command[1:], "cwd": str(cwd), "env": env}).encode()
    socket.send_fds(client, [struct.pack("!Q", len(request))], [stdin_r, out_w, err_w])
    client.sendall(request)
    for fd in (stdin_r, out_w, err_w):
        os.close(fd)
    captured = {}

    def drain(fd, name):
        with open(fd, "rb") as f:
            captured[name] = f.read()

    def feed():
        try:
            with open(stdin_w, "wb") as f:
                f.write(input.encode(encoding))
        except BrokenPipeError:  # the run stopped reading, as subprocess.run allows
            pass

    threads = [threading.Thread(target=drain, args=(out_r, "stdout"), daemon=True),
               threading.Thread(target=drain, args=(err_r, "stderr"), daemon=True)]
    if stdin_w is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for thread in threads:
        thread.start()
    with client:
        answers = lines(client)
        pid = answers()["pid"]
        client.settimeout(timeout)
        try:
            status = answers()["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)  # as subprocess.run does; what it wrote so far is not waited for
            raise subprocess.TimeoutExpired(command, timeout, captured.get("stdout"), captured.get("stderr"))
    for thread in threads:
        thread.join()
    out, err = (captured[name].decode(encoding).replace("\r\n", "\n").replace("\r", "\n")
                for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(status), out, err)


def lines(connection):
    """A function that returns the next JSON line the waiter sends on `connection`; one cut short by a
    timeout leaves what it read for the next call."""
    pending = [b""]

    def next_line():
        while b"\n" not in pending[0]:
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError("the waiting process ended before the run it started")
            pending[0] += chunk
        line, pending[0] = pending[0].split(b"\n", 1)
        return json.loads(line)
    return next_line


def serve(listener, alive):
    """Import what every run imports, then fork a run for each connection: a waiter that forks the run
    itself, tells the client its pid, waits for it and tells its exit status."""
    # The point of this process: what every run imports and spends its first seconds on. Not polars,
    # whose threads start at import, and a fork must not copy a process with threads at work.
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.distilbert.modeling_distilbert  # noqa: F401
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel
    while True:
        if alive in select.select([listener, alive], [], [])[0]:  # the tests have ended
            return
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            os.close(alive)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the waiter waits for its run; the run for its own
            wait_for_run(connection)
            # only the run returns here: it runs its script, then this interpreter ends as the script's would
            return
        connection.close()


def wait_for_run(connection):
    try:
        header, fds, _, _ = socket.recv_fds(connection, 8, 3)
        (size,) = struct.unpack("!Q", header)
        body = b""
        while len(body) < size:
            body += connection.recv(size - len(body))
        request = json.loads(body)
    except Exception:  # the client went away: nothing to run
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        connection.close()
        become(request, fds)
        return
    try:
        for fd in fds:
            os.close(fd)
        connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        connection.sendall(json.dumps({"status": status}).encode() + b"\n")
    finally:  # a client that stopped listening (its timeout) is no error of the run's
        os._exit(0)


def become(request, fds):
    """Turn this forked process into `python SCRIPT ARGS…` run in `cwd` under `env`, its streams `fds`."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    standard_streams()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    path = sys.argv[0]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    # A module of its own as __main__, kept until the interpreter ends, as `python SCRIPT` has
    script = types.ModuleType("__main__")
    script.__file__, script.__builtins__ = path, builtins
    sys.modules["__main__"] = script
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    exec(code, script.__dict__)


def standard_streams():
    """New sys.stdin, stdout and stderr over descriptors 0 to 2, made as the interpreter makes them at its start
    (Python/pylifecycle.c, create_stdio): the waiting process's were made for other files (/dev/null can seek,
    a pipe cannot; a terminal is line-buffered)."""
    unbuffered = sys.stdout.write_through  # PYTHONUNBUFFERED or -u, the same in every run forked here
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, "__" + name + "__")
        binary = io.open(fd, mode + "b", buffering=0 if unbuffered and mode == "w" else -1, closefd=False)
        raw = binary if isinstance(binary, io.FileIO) else binary.raw
        stream = io.TextIOWrapper(binary, encoding=old.encoding, errors=old.errors, newline="\n",
                                  line_buffering=not unbuffered and (raw.isatty() or fd == 2),
                                  write_through=unbuffered)
        stream.mode = mode
        setattr(sys, name, stream)
        setattr(sys, "__" + name + "__", stream)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
