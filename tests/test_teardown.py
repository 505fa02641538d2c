"""The exit guard (mindtron/parallel_core/teardown.py): a fault in a worker's teardown, after its work was
done, ends the process with status 0 and one line on stderr; a fault at any other time is still a crash.

MindSpore's own race (about once in a hundred msrun worker exits) cannot be triggered on demand, so each
script here stands in for it: a handler registered before the guard (as MindSpore's finalize is, by init())
faults on a thread at exit, as its RPC event-loop thread does.
"""
import os
import signal
import subprocess
import sys
import textwrap

from multiproc import REPO

MESSAGE = "mindtron: a fault in MindSpore's teardown"


def _run(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import atexit, ctypes, sys, threading
        from mindtron.parallel_core import teardown

        def fault_on_a_thread():
            thread = threading.Thread(target=ctypes.string_at, args=(0,))  # reads address 0: SIGSEGV
            thread.start()
            thread.join()
        """) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONFAULTHANDLER", None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_a_fault_in_the_teardown_after_the_guard_exits_0_with_a_message():
    done = _run("""
        atexit.register(fault_on_a_thread)  # registered first, so it runs after the guard is armed
        assert teardown.arm_at_exit() and teardown.armed_at_exit()
        print("the work is done", end="")  # no newline: the guard must flush it
        """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "the work is done"
    assert MESSAGE in done.stderr


def test_without_the_guard_the_same_teardown_fault_is_a_crash():
    done = _run("""
        atexit.register(fault_on_a_thread)
        print("the work is done")
        """)
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr[-3000:])
    assert MESSAGE not in done.stderr


def test_a_fault_while_the_program_runs_is_still_a_crash():
    done = _run("""
        assert teardown.arm_at_exit()
        fault_on_a_thread()
        """)
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr[-3000:])
    assert MESSAGE not in done.stderr
