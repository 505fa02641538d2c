"""Activation and gradient exchange between neighbouring pipeline stages (Megatron's p2p_communication).

Every function is a pairwise `comm.exchange`, so both neighbours must call the matching function at the
same point of their schedules, with the same shape (send_forward on stage i meets recv_forward on stage
i + 1; send_forward_recv_backward meets send_backward_recv_forward). The schedules are written so they do.
For the interleaved schedule the ring wraps from the last stage to the first.

Each exchange runs under Megatron's level-2 timer for its kind (forward-recv, forward-send, backward-recv,
backward-send, forward-send-backward-recv, backward-send-forward-recv, forward-send-forward-recv,
backward-send-backward-recv, forward-backward-send-forward-backward-recv).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core.timers import get_timers


def _next() -> int:
    return ps.get_pipeline_model_parallel_next_rank()


def _prev() -> int:
    return ps.get_pipeline_model_parallel_prev_rank()


def _swap(send: Optional[Tensor], peer: int, recv_shape: Optional[Sequence[int]], dtype,
          timer: str = "") -> Optional[Tensor]:
    if send is None and recv_shape is None:
        return None
    if not timer:
        return comm.exchange(send, peer, recv_shape, dtype)
    with get_timers()(timer, log_level=2):
        return comm.exchange(send, peer, recv_shape, dtype)


def recv_forward(shape: Sequence[int], dtype=ms.float32, first_stage: Optional[bool] = None) -> Optional[Tensor]:
    """The previous stage's output (None on the first stage)."""
    first = ps.is_pipeline_first_stage() if first_stage is None else first_stage
    return None if first else _swap(None, _prev(), shape, dtype, "forward-recv")


def send_forward(output: Optional[Tensor], dtype=ms.float32, last_stage: Optional[bool] = None) -> None:
    """Hand this stage's output to the next stage (nothing on the last stage)."""
    last = ps.is_pipeline_last_stage() if last_stage is None else last_stage
    if not last and output is not None:
        _swap(output, _next(), None, dtype, "forward-send")


def recv_backward(shape: Sequence[int], dtype=ms.float32, last_stage: Optional[bool] = None) -> Optional[Tensor]:
    """The gradient of this stage's output from the next stage (None on the last stage)."""
    last = ps.is_pipeline_last_stage() if last_stage is None else last_stage
    return None if last else _swap(None, _next(), shape, dtype, "backward-recv")


def send_backward(input_grad: Optional[Tensor], dtype=ms.float32, first_stage: Optional[bool] = None) -> None:
    """Hand the gradient of this stage's input to the previous stage (nothing on the first stage)."""
    first = ps.is_pipeline_first_stage() if first_stage is None else first_stage
    if not first and input_grad is not None:
        _swap(input_grad, _prev(), None, dtype, "backward-send")


def send_forward_recv_backward(output: Optional[Tensor], shape: Sequence[int], dtype=ms.float32,
                               last_stage: Optional[bool] = None) -> Optional[Tensor]:
    """Send the output forward and receive its gradient, in one exchange with the next stage."""
    last = ps.is_pipeline_last_stage() if last_stage is None else last_stage
    return None if last else _swap(output, _next(), shape, dtype, "forward-send-backward-recv")


def send_backward_recv_forward(input_grad: Optional[Tensor], shape: Sequence[int], dtype=ms.float32,
                               first_stage: Optional[bool] = None) -> Optional[Tensor]:
    """Send the input gradient back and receive the next input, in one exchange with the previous stage."""
    first = ps.is_pipeline_first_stage() if first_stage is None else first_stage
    return None if first else _swap(input_grad, _prev(), shape, dtype, "backward-send-forward-recv")


def exchange_with_both(output: Optional[Tensor], input_grad: Optional[Tensor], recv_prev: bool, recv_next: bool,
                       shape: Sequence[int], dtype=ms.float32) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Interleaved schedule: send `output` to the next stage and `input_grad` to the previous one, receiving
    an input from the previous and a gradient from the next where asked; returns (input, output_grad).

    The two pairwise exchanges run in an order that cannot deadlock on the ring: even stages talk to the
    next stage first, odd stages to the previous one first, so each pair meets in the same round. With one
    stage the exchange is with itself and is skipped by the schedule.
    """
    with get_timers()(_exchange_timer(output, input_grad, recv_prev, recv_next), log_level=2):
        return _exchange_with_both(output, input_grad, recv_prev, recv_next, shape, dtype)


def _exchange_timer(output, input_grad, recv_prev: bool, recv_next: bool) -> str:
    """Megatron's timer name for what this exchange carries."""
    forward = {"send": output is not None, "recv": recv_prev}
    backward = {"send": input_grad is not None, "recv": recv_next}
    if any(forward.values()) and any(backward.values()):
        return "forward-backward-send-forward-backward-recv"
    kind, parts = ("forward", forward) if any(forward.values()) else ("backward", backward)
    if parts["send"] and parts["recv"]:
        return f"{kind}-send-{kind}-recv"
    return f"{kind}-send" if parts["send"] else f"{kind}-recv"


def _exchange_with_both(output, input_grad, recv_prev, recv_next, shape, dtype):
    rank = ps.get_pipeline_model_parallel_rank()
    size = ps.get_pipeline_model_parallel_world_size()

    def with_next():
        return _swap(output, _next(), shape if recv_next else None, dtype)

    def with_prev():
        return _swap(input_grad, _prev(), shape if recv_prev else None, dtype)

    if size == 2:  # next and previous are the same rank: one exchange carries both directions
        return _both_ways_two_stages(output, input_grad, recv_prev, recv_next, shape, dtype)
    if rank % 2 == 0:
        grad_from_next = with_next()
        input_from_prev = with_prev()
    else:
        input_from_prev = with_prev()
        grad_from_next = with_next()
    return input_from_prev, grad_from_next


def _both_ways_two_stages(output, input_grad, recv_prev, recv_next, shape, dtype):
    """Two stages: the peer is both neighbours, so activation and gradient share one exchange."""
    from mindspore import ops

    peer = _next()
    parts = [t.reshape(-1).astype(dtype) for t in (output, input_grad) if t is not None]
    send = ops.concat(parts) if parts else None
    numel = 1
    for d in shape:
        numel *= int(d)
    expected = (numel if recv_prev else 0) + (numel if recv_next else 0)
    received = comm.exchange(send, peer, (expected,) if expected else None, dtype)
    if received is None:
        return None, None
    # The peer packs its output (our next input) before its input gradient (our output gradient).
    offset = 0
    input_from_prev = grad_from_next = None
    if recv_prev:
        input_from_prev = received[:numel].reshape(tuple(shape))
        offset = numel
    if recv_next:
        grad_from_next = received[offset:offset + numel].reshape(tuple(shape))
    return input_from_prev, grad_from_next
