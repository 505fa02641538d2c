"""Memory of a training process: the host's resident set and, where the device reports it, device memory.

`report_memory(name)` is Megatron's line, `[Rank R] <name> memory (MB) | allocated: ... | max allocated:
... | reserved: ... | max reserved: ... |` from MindSpore's runtime statistics, with the host's `host rss` and
`max host rss` added. MindSpore on CPU reports 0 device memory, so there the device fields are left out
and the host figures are the ones that mean something.
"""
from __future__ import annotations

import resource
import sys
from typing import Dict

__all__ = ["memory_stats", "report_memory"]

_MB = 1024.0 * 1024.0


def _host_rss_bytes() -> int:
    # /proc gives the current resident set; elsewhere fall back to the peak.
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _host_max_rss_bytes()


def _host_max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _device_stats() -> Dict[str, int]:
    import mindspore as ms

    if ms.get_context("device_target") == "CPU":
        return {}  # MindSpore's CPU runtime keeps no statistics (they read 0)
    try:
        stats = {"allocated": ms.runtime.memory_allocated(), "max allocated": ms.runtime.max_memory_allocated(),
                 "reserved": ms.runtime.memory_reserved(), "max reserved": ms.runtime.max_memory_reserved()}
    except (AttributeError, RuntimeError):
        return {}
    return {k: int(v) for k, v in stats.items()}


def memory_stats() -> Dict[str, int]:
    """Bytes: `host rss`, `max host rss`, and the device's allocated/reserved figures when it has them."""
    stats = _device_stats()
    stats["host rss"] = _host_rss_bytes()
    stats["max host rss"] = max(_host_max_rss_bytes(), stats["host rss"])  # the kernel's peak lags a little
    return stats


def report_memory(name: str, rank: int) -> str:
    """Megatron's memory line for this process (the caller prints it)."""
    parts = [f"{key}: {value / _MB:.2f}" for key, value in memory_stats().items()]
    return f"[Rank {rank}] {name} memory (MB) | " + " | ".join(parts) + " |"
