"""Which fused kernels run here: chosen once by backend, with a one-time notice when a flag asks for one
that this backend lacks.

MindSpore's fused flash attention, rotary embedding, SwiGLU and RMSNorm kernels exist only on Ascend. The
layers ask `use_fused(name, requested)`; when it says no they compute the same maths with plain ops, so a
flag such as --use-flash-attn works everywhere and changes only speed.
"""
from __future__ import annotations

import functools
import logging

import mindspore as ms

logger = logging.getLogger("mindtron")

FLAGS = {
    "flash_attention": "--use-flash-attn",
    "rope": "--apply-rope-fusion",
    "swiglu": "--use-fused-swiglu",
    "rmsnorm": "--use-fused-rmsnorm",
}


@functools.lru_cache(maxsize=None)
def fused_kernels_available() -> bool:
    """True on backends with MindSpore's fused transformer kernels (Ascend)."""
    return ms.get_context("device_target") == "Ascend"


_noticed: set = set()


def use_fused(name: str, requested: bool) -> bool:
    """Whether to run the fused kernel `name`; notes once per kernel when it was requested but is absent."""
    if not requested:
        return False
    if fused_kernels_available():
        return True
    if name not in _noticed:
        _noticed.add(name)
        logger.warning("%s: no fused %s kernel on %s; computing the same maths with plain ops",
                       FLAGS[name], name, ms.get_context("device_target"))
    return False
