"""How the routers' auxiliary losses reach the backward pass, and when a forward counts.

Megatron does not add the load-balancing and z-losses to the language-model loss. The router attaches each
one to an activation through an identity whose backward also feeds the loss a gradient of
`backward_scale` (the main loss's scale: loss scale / number of micro-batches, set by the schedule). The
applied gradient is then that of lm_loss + sum of the auxiliary losses, while the logged lm loss stays the
language-model loss. Pipeline stages that re-run their forward in the backward pass get the same
gradient, because the attachment is part of the forward they re-run.

Statistics (logged auxiliary losses, tokens counted for the expert bias) must be gathered once per real
forward: not again when a recomputed layer or a pipeline stage re-runs its forward for the backward.
`counting()` says whether the current forward counts.
"""
from __future__ import annotations

import contextlib

from mindspore import Tensor, nn, ops

from mindtron.parallel_core.tensor_parallel import random as tp_random

_BACKWARD_SCALE = [1.0]
_PAUSED = [0]


def set_aux_loss_backward_scale(scale: float) -> None:
    """The factor the auxiliary losses' gradient gets (Megatron's MoEAuxLossAutoScaler.set_loss_scale)."""
    _BACKWARD_SCALE[0] = float(scale)


def aux_loss_backward_scale() -> float:
    """The factor set by `set_aux_loss_backward_scale` (1.0 until a schedule sets one)."""
    return _BACKWARD_SCALE[0]


class AuxLossAutoScaler(nn.Cell):
    """Identity on `x` whose backward also gives `aux_loss` the gradient backward_scale."""

    def construct(self, x, aux_loss):
        return x

    def bprop(self, x, aux_loss, out, dout):
        # read when the backward runs: the schedule sets the scale for the whole iteration
        return dout, ops.ones_like(aux_loss) * _BACKWARD_SCALE[0]


_SCALER = AuxLossAutoScaler()


def attach_aux_loss(x: Tensor, aux_loss: Tensor) -> Tensor:
    """`x` unchanged; the backward adds d(aux_loss) x backward_scale to the gradients."""
    return _SCALER(x, aux_loss)


@contextlib.contextmanager
def replaying():
    """Mark a forward that is re-run only to compute gradients (a pipeline stage's backward): its router
    statistics are not counted again."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def counting() -> bool:
    """Whether router statistics of the current forward count: inside a model's forward pass, not a
    recompute pass (which runs outside one) and not a replay."""
    return _PAUSED[0] == 0 and tp_random.in_forward_pass()
