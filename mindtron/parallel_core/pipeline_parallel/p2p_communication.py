"""Activation and gradient exchange between neighbouring pipeline stages (Megatron's p2p_communication).

Every function is a pairwise `comm.exchange`, so both neighbours must call the matching function at the
same point of their schedules, with the same shape (send_forward on stage i meets recv_forward on stage
i + 1; send_forward_recv_backward meets send_backward_recv_forward). The schedules are written so they do.
For the interleaved schedule the ring wraps from the last stage to the first.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps


def _next() -> int:
    return ps.get_pipeline_model_parallel_next_rank()


def _prev() -> int:
    return ps.get_pipeline_model_parallel_prev_rank()


def _swap(send: Optional[Tensor], peer: int, recv_shape: Optional[Sequence[int]], dtype) -> Optional[Tensor]:
    if send is None and recv_shape is None:
        return None
    received = comm.exchange(send, peer, recv_shape, dtype)
    return received


def recv_forward(shape: Sequence[int], dtype=ms.float32, first_stage: Optional[bool] = None) -> Optional[Tensor]:
    """The previous stage's output (None on the first stage)."""
    first = ps.is_pipeline_first_stage() if first_stage is None else first_stage
    return None if first else _swap(None, _prev(), shape, dtype)


def send_forward(output: Optional[Tensor], dtype=ms.float32, last_stage: Optional[bool] = None) -> None:
    """Hand this stage's output to the next stage (nothing on the last stage)."""
    last = ps.is_pipeline_last_stage() if last_stage is None else last_stage
    if not last and output is not None:
        _swap(output, _next(), None, dtype)


def recv_backward(shape: Sequence[int], dtype=ms.float32, last_stage: Optional[bool] = None) -> Optional[Tensor]:
    """The gradient of this stage's output from the next stage (None on the last stage)."""
    last = ps.is_pipeline_last_stage() if last_stage is None else last_stage
    return None if last else _swap(None, _next(), shape, dtype)


def send_backward(input_grad: Optional[Tensor], dtype=ms.float32, first_stage: Optional[bool] = None) -> None:
    """Hand the gradient of this stage's input to the previous stage (nothing on the first stage)."""
    first = ps.is_pipeline_first_stage() if first_stage is None else first_stage
    if not first and input_grad is not None:
        _swap(input_grad, _prev(), None, dtype)


def send_forward_recv_backward(output: Optional[Tensor], shape: Sequence[int], dtype=ms.float32,
                               last_stage: Optional[bool] = None) -> Optional[Tensor]:
    """Send the output forward and receive its gradient, in one exchange with the next stage."""
    last = ps.is_pipeline_last_stage() if last_stage is None else last_stage
    return None if last else _swap(output, _next(), shape, dtype)


def send_backward_recv_forward(input_grad: Optional[Tensor], shape: Sequence[int], dtype=ms.float32,
                               first_stage: Optional[bool] = None) -> Optional[Tensor]:
    """Send the input gradient back and receive the next input, in one exchange with the previous stage."""
    first = ps.is_pipeline_first_stage() if first_stage is None else first_stage
    return None if first else _swap(input_grad, _prev(), shape, dtype)


def exchange_with_both(output: Optional[Tensor], input_grad: Optional[Tensor], recv_prev: bool, recv_next: bool,
                       shape: Sequence[int], dtype=ms.float32) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Interleaved schedule: send `output` to the next stage and `input_grad` to the previous one, receiving
    an input from the previous and a gradient from the next where asked; returns (input, output_grad).

    The two pairwise exchanges run in an order that cannot deadlock on the ring: even stages talk to the
    next stage first, odd stages to the previous one first, so each pair meets in the same round. With one
    stage the exchange is with itself and is skipped by the schedule.
    """
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
