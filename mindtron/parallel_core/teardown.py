"""Keep MindSpore 2.10's exit race from failing a finished msrun job.

Under msrun, MindSpore finalizes its cluster from an atexit handler: the worker unregisters from the
scheduler, then stops the event-loop threads of its RPC clients. About once in a hundred worker exits on the
development machine, one of those threads takes a SIGSEGV inside libmindspore_cluster.so while the main
thread joins it (core dump: FinalizeCluster, ClusterContext::Finalize, ComputeGraphNode::Finalize,
TCPClient::Finalize). The job was done, yet msrun reports the worker's -11 and fails the launch.

`arm_at_exit()`, called once the worker has joined the cluster, registers an atexit handler. Python runs
atexit handlers last-registered first, so this one runs after the program's own (registered later) and
before MindSpore's teardown (registered by `init()`, earlier). It flushes stdout and stderr, then installs a
native handler (teardown_guard.cc) under which a SIGSEGV or SIGBUS writes one line to stderr and exits with
status 0. A fault before the worker unregistered still fails the job: the scheduler sees the worker vanish.
A fault while the program runs is a crash as before; the guard is armed only at exit.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import subprocess
import sys
from pathlib import Path

from .cpu_kernels import build

logger = logging.getLogger("mindtron")

SOURCE = Path(__file__).with_name("cpu_kernels") / "teardown_guard.cc"
_armed_at_exit = []  # the loaded guard library, once its handler is registered


def arm_at_exit() -> bool:
    """Register the guard for this process's exit (once); False when it cannot be built here."""
    if _armed_at_exit:
        return True
    try:
        guard = ctypes.CDLL(str(build(SOURCE, ["-O2", "-shared", "-fPIC"])))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("mindtron's exit guard is unavailable (%s): a crash in MindSpore's cluster teardown "
                       "will fail the launch even after the work is done", error)
        return False
    atexit.register(_arm, guard)
    _armed_at_exit.append(guard)
    return True


def _arm(guard: ctypes.CDLL) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams have nothing to flush
            pass
    guard.ArmTeardownGuard()


def armed_at_exit() -> bool:
    """Whether this process will arm the guard when it exits."""
    return bool(_armed_at_exit)
