"""A script forked from the tests' waiting process (prefork.py) runs as one started afresh."""

import os
import subprocess
import sys
import textwrap
import time

import prefork
import pytest


@pytest.fixture(autouse=True)
def waiting_process():
    if not prefork._server:  # started by conftest for the session, unless told not to
        pytest.skip("the scripts start afresh in this session (SENTIMENT_TESTS_PREFORK=0, or a GPU)")


WHAT_IT_SEES = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "seen": os.environ.get("SENTIMENT_SEEN"),
                  "name": __name__, "file": __file__, "path0": sys.path[0], "stdin": sys.stdin.read(),
                  "streams": [(s.seekable(), s.line_buffering, s.encoding, s.errors) for s in (sys.stdout, sys.stderr)],
                  "main_is_this": sys.modules["__main__"].__dict__ is globals()}))
sys.stdout.reconfigure(errors="backslashreplace")
print("to stderr\\r\\nacross lines", file=sys.stderr)
import atexit
atexit.register(lambda: print("exit handler", flush=True))
sys.exit(int(sys.argv[1]))
"""


def both(tmp_path, source, *args, input=None, env=None, timeout=60):
    """The script `source` run as `python script ARGS` afresh and forked: both CompletedProcesses."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    command = [sys.executable, str(script), *args]
    env = {**prefork._server["env"], **(env or {})}  # what other tests' libraries added since is not its concern
    fresh = subprocess.run(command, cwd=tmp_path, env=env, input=input, capture_output=True, text=True,
                           timeout=timeout)
    forked = prefork.run(command, tmp_path, env, input=input, timeout=timeout)
    assert forked is not None
    return fresh, forked


def test_arguments_folder_environment_streams_and_exit_are_a_fresh_run_s(tmp_path):
    fresh, forked = both(tmp_path, WHAT_IT_SEES, "3", "ünïcode", input="piped\nin\n",
                         env={"SENTIMENT_SEEN": "yes"})
    assert forked.returncode == fresh.returncode == 3
    assert forked.stdout == fresh.stdout and '"seen": "yes"' in fresh.stdout and "exit handler" in fresh.stdout
    assert forked.stderr == fresh.stderr == "to stderr\nacross lines\n"


ENDINGS = {"an interrupt": ("raise KeyboardInterrupt", -2),
           "a signal": ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -15),
           "an exception": ("raise ValueError('broken')", 1)}


@pytest.mark.parametrize("ending", ENDINGS)
def test_an_interrupt_a_signal_or_an_exception_ends_it_as_a_fresh_run(tmp_path, ending):
    source, code = ENDINGS[ending]
    fresh, forked = both(tmp_path, f"print('started', flush=True)\n{source}\n")
    assert forked.returncode == fresh.returncode == code
    assert forked.stdout == fresh.stdout == "started\n"
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


def test_a_run_past_its_timeout_is_killed_as_subprocess_run_does(tmp_path):
    (tmp_path / "slow.py").write_text("import time\nprint('waiting', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        prefork.run([sys.executable, str(tmp_path / "slow.py")], tmp_path, prefork._server["env"], timeout=3)


def test_an_environment_read_at_import_starts_afresh():
    env = prefork._server["env"]
    assert prefork.forkable([sys.executable, "infer.py"], {**env, "SENTIMENT_MAX_BATCH": "4"})
    assert not prefork.forkable([sys.executable, "infer.py"], {**env, "HF_HUB_OFFLINE": "1"})
    assert not prefork.forkable([sys.executable, "infer.py"], {k: v for k, v in env.items() if k != "HOME"})
    assert not prefork.forkable([sys.executable, "-m", "accelerate.commands.launch"], env)


def test_the_waiting_process_ends_with_the_tests_that_started_it(tmp_path):
    # A test worker killed, or pytest stopped before its clean-up, must not leave it running for ever.
    tests = subprocess.run([sys.executable, "-c", "import os, prefork; prefork.start(dict(os.environ)); "
                            "print(prefork._server['process'].pid); os._exit(0)"],
                           cwd=os.path.dirname(__file__), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True, check=True, timeout=60)  # its stderr: the waiting process's, never closed
    waiting = int(tests.stdout)
    deadline = time.monotonic() + 120  # its imports first, then it sees the tests have gone
    while time.monotonic() < deadline and running(waiting):
        time.sleep(0.5)
    assert not running(waiting)


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended, its parent has yet to reap it
    except FileNotFoundError:
        return False
