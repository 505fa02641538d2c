"""Process-wide MindSpore settings for dynamic-graph (PyNative) training."""
from __future__ import annotations

import os
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


def cpu_kernel_threads(pipeline_size: int = 1) -> int:
    """How many threads mindtron's CPU kernels use in this process (cpu_kernels.set_threads).

    MINDTRON_CPU_THREADS sets it outright. Otherwise each process gets its share of the cores it may run on:
    cores / the job's processes on this host, at least 1. On a host with no more processes than cores, a
    pipeline stage's share is multiplied by the pipeline size: stages wait for each other during part of
    every step (the 1F1B bubble, the exchanges), and a stage that computes alone can use its waiting
    neighbours' cores (PP=2 on 2 cores: 1.06-1.12x faster on a quiet host, bench/README.md). Once processes
    outnumber cores, extra threads only slow every process down (measured with 4 ranks on 2 cores). The
    cores are the ones this process may run on (its CPU affinity); under `msrun --bind_core`, where that is
    already one worker's share, set MINDTRON_CPU_THREADS. OMP_NUM_THREADS does not decide it: msrun sets
    it for every worker to an eighth of the cores (1 on hosts with fewer than 16).
    """
    explicit = os.environ.get("MINDTRON_CPU_THREADS")
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise ValueError(f"MINDTRON_CPU_THREADS={explicit!r}: give a whole number of threads, 1 or more "
                             "(or unset it to size the kernels from the layout)")
        return int(explicit)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, comm.processes_on_this_host())
    if processes > cores:
        return 1
    return max(1, min(cores, cores * pipeline_size // processes))


def size_cpu_kernel_threads(pipeline_size: int = 1) -> Optional[int]:
    """Give the CPU kernels cpu_kernel_threads(pipeline_size) threads; returns the count (None off CPU or
    without the kernels). parallel_state.initialize_model_parallel calls it once the layout is known."""
    from mindtron.parallel_core import cpu_kernels

    if ms.get_context("device_target") != "CPU":  # the same on every rank
        return None
    comm.processes_on_this_host()  # a collective: every rank takes part, whatever it decides below
    if cpu_kernels.library() is None:
        return None
    return cpu_kernels.set_threads(cpu_kernel_threads(pipeline_size))
