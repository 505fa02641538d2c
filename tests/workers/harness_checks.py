"""Workers for tests/test_multiproc.py: how run_on_ranks reports ranks that fail or die on exit."""
import atexit
import os
import signal
import sys
import time
from pathlib import Path

from mindtron.parallel_core import comm


def dies_on_exit() -> int:
    """Returns its rank; rank 1 then takes a segmentation fault while its process shuts down, once rank 0's
    result is written (msrun stops the other workers when one dies)."""
    if comm.get_rank() == 1:
        atexit.register(_segfault_after, Path(sys.argv[3]) / "rank_0.pkl")
    return comm.get_rank()


def _segfault_after(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGSEGV)


def fails_on_rank_1() -> int:
    if comm.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return comm.get_rank()
