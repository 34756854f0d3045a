"""What several test files share: running the project's scripts, quick tiny-model flags, a fake Predictor.

Fixtures live in `conftest.py`; this module holds plain helpers, imported by name.
"""

import contextlib
import fcntl
import itertools
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import time
import traceback

import numpy as np
import prefork
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sentiment.predictor import Predictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Quick, reproducible settings for the tiny model; tests add or override flags.
TINY = ["--model", "tiny", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--max-length", "64",
        "--seed", "0"]

# `python -m accelerate.commands.launch` as `accelerate launch` runs on this CPU, before the script:
# `run_script(*ONE_PROCESS, "train.py", …)`; for two processes, `two_processes()`.
ONE_PROCESS = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no"]


def two_processes():
    """The launcher's flags for two processes on this CPU, before the script: `run_script(*two_processes(),
    "train.py", …)`. Each run has a free port of its own, as two test workers may launch at the same moment;
    Accelerate picks one for `--main_process_port 0` only from 1.7, and before that its processes wait
    forever for a store on port 0 (`.ci/lowest` tests 1.4)."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]


# Loaded by every Python process started with `threads_at_exit(folder)`'s environment: when its interpreter
# begins to shut down (the last exit handler), it writes its arguments and its threads' names to folder/<pid>;
# when it destroys a process group, how many DDP wrappers were alive then, to folder/destroy-<pid>.
THREADS_AT_EXIT = """
import atexit, gc, json, os, sys

import torch.distributed
from torch.nn.parallel import DistributedDataParallel

destroy_process_group = torch.distributed.destroy_process_group

def destroy_and_record(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    with open(os.path.join(FOLDER, f"destroy-{os.getpid()}"), "w") as f:
        json.dump({"argv": sys.argv, "ddp_alive": alive}, f)
    return destroy_process_group(*args, **kwargs)

torch.distributed.destroy_process_group = destroy_and_record

def name(task):
    try:
        with open(f"/proc/self/task/{task}/comm") as f:
            return f.read().strip()
    except OSError:  # the thread ended since the folder was listed
        return None

def record():
    names = [n for n in map(name, os.listdir("/proc/self/task")) if n is not None]
    with open(os.path.join(FOLDER, str(os.getpid())), "w") as f:
        json.dump({"argv": sys.argv, "threads": names}, f)

atexit.register(record)
"""


def run_script(*args, check=True, env=None, cwd=ROOT, **kwargs):
    """Run a top-level script of the project (`train.py`, `infer.py`, …) with this interpreter; one that
    hangs fails its test after `timeout` seconds rather than holding up the whole suite."""
    kwargs.setdefault("timeout", 600)
    script = os.path.join(ROOT, args[0]) if args[0].endswith(".py") else args[0]
    command = [sys.executable, script, *args[1:]]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = prefork.run(command, cwd, env, **kwargs) if set(kwargs) <= {"input", "timeout"} else None
    if result is None:  # not a script, or an environment read at import (prefork.py says which)
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def threads_at_exit(folder):
    """An environment for `run_script` under which each Python process it starts says which of its threads
    were still running as its interpreter began to shut down; read them back with `gloo_threads_left`."""
    os.makedirs(folder / "site")
    (folder / "site" / "sitecustomize.py").write_text(f"FOLDER = {str(folder)!r}\n{THREADS_AT_EXIT}")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder / "site"), os.environ.get("PYTHONPATH")]))}


def gloo_threads_left(folder, script):
    """For each process that ran `script` under `threads_at_exit(folder)`, its gloo threads still running
    at exit: `[[], []]` for two processes whose process group was freed first."""
    records = [json.loads(path.read_text()) for path in folder.iterdir() if path.name.isdigit()]
    return [[name for name in r["threads"] if "gloo" in name] for r in records
            if r["argv"] and os.path.basename(r["argv"][0]) == script]


def wrappers_alive_at_destroy(folder, script):
    """For each process that ran `script` under `threads_at_exit(folder)` and destroyed its process group,
    how many DDP wrappers were still alive at that moment: `[0, 0]` for two processes that let go of
    theirs first (one freed after the group joins gloo's threads holding the GIL, which can hang)."""
    records = [json.loads(path.read_text()) for path in folder.iterdir() if path.name.startswith("destroy-")]
    return [r["ddp_alive"] for r in records if os.path.basename(r["argv"][0]) == script]


def predict_sh(url, *args, stdin=None):
    """Run predict_sentiment.sh against `url`; `stdin` as text, or bytes (then the output is bytes too)."""
    return subprocess.run([os.path.join(ROOT, "predict_sentiment.sh"), *args], input=stdin, capture_output=True,
                          text=not isinstance(stdin, bytes), env={**os.environ, "SENTIMENT_URL": url}, timeout=60)


def renames_made_durable(monkeypatch):
    """Watch `os.replace`: the returned dict maps each path a file was renamed onto (real paths) to
    whether the file's bytes, all of them, were flushed (fsync) before the rename and the folder after
    it. A rename reaches the disk before the data it names, so without both a power cut can leave an
    empty file where the old one was."""
    flushed, waiting, durable = {}, {}, {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        flushed[path] = os.fstat(fd).st_size
        for target in [t for t, folder in waiting.items() if folder == path]:
            durable[target] = True
            del waiting[target]

    def replace(source, target):
        source, target = os.path.realpath(source), os.path.realpath(target)
        data_flushed = os.path.isfile(source) and flushed.get(source) == os.path.getsize(source)
        real_replace(source, target)
        durable[target] = False
        if data_flushed:
            waiting[target] = os.path.dirname(target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return durable


PORTS_PER_WORKER = 1000
_ports_given = itertools.count(int.from_bytes(os.urandom(2), "big"))  # two suites at once start apart


def ephemeral_ports():
    """The range the kernel picks a port from for `bind(0)` and for each outgoing connection."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except OSError:  # not Linux: the range IANA suggests, which other systems use
        low, high = 49152, 65535
    return range(low, high + 1)


def free_port():
    """A port free now that the kernel will not hand out by itself until a test listens on it. A port from
    `bind(0)` is ephemeral: between closing it here and a launcher listening on it, another test's outgoing
    connection (gloo opens many) could take it, and torchrun failed with EADDRINUSE. So the port comes from
    below the ephemeral range, from a block of its own for each test worker, never the same twice in a row."""
    ephemeral = ephemeral_ports()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = 10_000 + PORTS_PER_WORKER * (int(worker) if worker.isdigit() else 0)
    for _ in range(PORTS_PER_WORKER):
        port = first + next(_ports_given) % PORTS_PER_WORKER
        if port in ephemeral or port > 65535:
            break  # more workers than blocks below the range: fall back to the kernel's pick
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:  # some other program listens there
                continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakePredictor:
    """Stands in for `Predictor` in service tests that need a slow, failing or observable model."""

    labels = ["negative", "positive"]
    max_batch_tokens, max_length = 4096, 512
    device, failure = "cpu", None  # failure: what device_fails says

    def __init__(self, delay=0.0, gate=None, batch_size=16, function="softmax"):
        self.delay, self.gate, self.batch_size, self.batches = delay, gate, batch_size, []
        self.function = function

    def probabilities(self, texts):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        if any("boom" in t for t in texts):
            raise ValueError("the model broke")
        self.batches.append(list(texts))
        return np.array([[0.1, 0.9] if "good" in t else [0.8, 0.2] for t in texts])

    def answer(self, probs):
        return Predictor.answer(self, probs)

    def device_fails(self):
        return self.failure


# train.py (or infer.py) run by a script that writes how it ended to the file named first: under a launcher,
# which the hang-up kills, the run's own exit status reaches no one.
RECORDS_ITS_END = """
import runpy, sys
record, sys.argv = sys.argv[1], sys.argv[2:]
status = "killed"
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    status = 0
except SystemExit as stop:
    status = stop.code
    raise
except BaseException as err:
    status = repr(err)
    raise
finally:
    with open(record, "w") as f:
        f.write(str(status))
"""


def recording_its_end(tmp_path, script):
    """The command line that runs `script` under RECORDS_ITS_END (after `python` and any launcher), and
    `its_end()`, which waits for the record and returns it."""
    wrapper, record = tmp_path / "records_its_end.py", tmp_path / "its_end"
    wrapper.write_text(RECORDS_ITS_END)

    def its_end(seconds=120):
        deadline = time.monotonic() + seconds
        while not record.exists() or not record.read_text():  # a launcher's child may outlive it a moment
            assert time.monotonic() < deadline, f"{script} did not end"
            time.sleep(0.1)
        return record.read_text()
    return [str(wrapper), str(record), os.path.join(ROOT, script)], its_end


def hang_up_while_it_runs(tmp_path, launcher, script, *flags, started):
    """Run `script` in a terminal of its own (under `launcher`), read what it prints until `started()`,
    close the terminal, and return how the script ended, as RECORDS_ITS_END wrote it."""
    command, its_end = recording_its_end(tmp_path, script)
    terminal, its_side = pty.openpty()

    def in_its_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # As started from a terminal: the tests run under nohup (SIGHUP ignored, and so in every child) had runs
        # that rightly ignored the hang-up, and ended 0.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, *launcher, *command, *flags], cwd=ROOT, stdin=its_side,
                               stdout=its_side, stderr=its_side, start_new_session=True, preexec_fn=in_its_terminal,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    os.close(its_side)
    os.set_blocking(terminal, False)
    try:
        deadline = time.monotonic() + 120
        while not started():  # read what it prints, as a terminal does
            assert process.poll() is None and time.monotonic() < deadline
            with contextlib.suppress(BlockingIOError):
                os.read(terminal, 1 << 16)
            time.sleep(0.05)
    finally:
        os.close(terminal)  # the terminal is gone: Linux sends SIGHUP, and writes to it fail from now on
    process.wait(timeout=120)
    return its_end()


def cudnn_attention_allowed(monkeypatch):
    """A list that gets, at each SDPA call (as transformers makes it), whether cuDNN attention was allowed."""
    allowed, real = [], torch.nn.functional.scaled_dot_product_attention

    def attention(*args, **kwargs):
        allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    return allowed


class DeviceWaits(TorchDispatchMode):
    """Counts the operations that, on a GPU, make the CPU wait for the device: a tensor's value read on the
    host (`.item()`, `bool(t)`, `if t.all()`) or a result whose size depends on its values (`nonzero`,
    boolean indexing). Counted on the CPU too, where nothing waits, so a test without a GPU sees them.
    `waits` holds the names of the functions on the stack at each."""

    OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "allclose", "unique",
           "_unique2", "masked_scatter"}

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func.overloadpacket.__name__ in ("index", "index_put_") and any(
            getattr(i, "dtype", None) == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if func.overloadpacket.__name__ in self.OPS or boolean_index:
            self.waits.append([frame.name for frame in traceback.extract_stack()])
        return func(*args, **(kwargs or {}))

    def within(self, function, outside=()):
        """The waits that came from inside `function` (a name), but from none of the functions `outside`."""
        return [w for w in self.waits if function in w and not any(name in w for name in outside)]
