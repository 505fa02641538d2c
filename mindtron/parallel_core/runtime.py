"""Process-wide MindSpore settings for dynamic-graph (PyNative) training."""
from __future__ import annotations

from typing import Optional

import mindspore as ms

from mindtron.parallel_core import comm


def init_runtime(device_target: Optional[str] = None) -> None:
    """Select PyNative mode and the device, then start communication (a no-op outside a launcher).

    On CPU, synchronous execution is set: MindSpore's asynchronous PyNative mode is many times slower there
    for small ops and collectives, and reports errors at a later op than the one that failed.
    """
    if device_target is not None:
        ms.set_context(device_target=device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if ms.get_context("device_target") == "CPU":
        ms.set_context(pynative_synchronize=True)
    comm.init_distributed()
