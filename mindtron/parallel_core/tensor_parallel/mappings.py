"""Autodiff-aware moves of activations into and out of the tensor- and sequence-parallel regions.

Each mapping is a Cell with a custom bprop, so its backward is the communication the maths needs rather
than whatever MindSpore would derive:

| mapping                               | forward                          | backward                       |
|---------------------------------------|----------------------------------|--------------------------------|
| copy_to_tensor_model_parallel_region  | identity                         | all-reduce                     |
| reduce_from_tensor_model_parallel_region | all-reduce                    | identity                       |
| scatter_to_tensor_model_parallel_region  | keep own chunk of last dim    | all-gather last dim            |
| gather_from_tensor_model_parallel_region | all-gather last dim           | keep own chunk of last dim     |
| scatter_to_sequence_parallel_region   | keep own chunk of dim 0          | all-gather dim 0               |
| gather_from_sequence_parallel_region  | all-gather dim 0                 | reduce-scatter dim 0 (or chunk)|
| reduce_scatter_to_sequence_parallel_region | reduce-scatter dim 0        | all-gather dim 0               |

Sequence-parallel activations are [s/tp, b, h]: dim 0 is the sequence. `group` defaults to the
tensor-parallel group of parallel_state.
"""
from __future__ import annotations

from typing import Optional

from mindspore import Tensor, nn, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core.comm import ProcessGroup


def _tp_group(group: Optional[ProcessGroup]) -> ProcessGroup:
    if group is not None:
        return group
    from mindtron.parallel_core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _own_chunk(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    size = x.shape[dim]
    if size % group.size:
        raise ValueError(f"dimension {dim} of size {size} cannot be split evenly over the "
                         f"{group.size} tensor-parallel ranks")
    part = size // group.size
    return ops.narrow(x, dim, group.rank * part, part)


class _Region(nn.Cell):
    """A mapping: forward and backward are each one of the named moves below."""

    def __init__(self, group: ProcessGroup, forward: str, backward: str, dim: int):
        super().__init__()
        self.group, self.forward_move, self.backward_move, self.dim = group, forward, backward, dim

    def _move(self, move: str, x: Tensor) -> Tensor:
        if move == "identity":
            return x
        if move == "all_reduce":
            return comm.all_reduce(x, self.group)
        if move == "all_gather":
            return comm.all_gather(x, self.group, dim=self.dim)
        if move == "reduce_scatter":
            return comm.reduce_scatter(x, self.group, dim=self.dim)
        if move == "chunk":
            return _own_chunk(x, self.dim, self.group)
        raise KeyError(move)  # pragma: no cover

    def construct(self, x):
        return self._move(self.forward_move, x)

    def bprop(self, x, out, dout):
        return (self._move(self.backward_move, dout),)


_cache: dict = {}


def _apply(x: Tensor, group: Optional[ProcessGroup], forward: str, backward: str, dim: int) -> Tensor:
    group = _tp_group(group)
    if group.size == 1:
        return x
    if dim < 0:
        dim += x.ndim
    key = (group.ranks, forward, backward, dim)
    cell = _cache.get(key)
    if cell is None:
        cell = _cache[key] = _Region(group, forward, backward, dim)
    return cell(x)


def copy_to_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Enter a tensor-parallel region with a replicated input: identity, gradients all-reduced."""
    return _apply(x, group, "identity", "all_reduce", 0)


def reduce_from_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce, gradient passes through."""
    return _apply(x, group, "all_reduce", "identity", 0)


def scatter_to_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Keep this rank's chunk of the last dimension; gradients are all-gathered."""
    return _apply(x, group, "chunk", "all_gather", -1)


def gather_from_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Concatenate every rank's chunk along the last dimension; gradients are split back."""
    return _apply(x, group, "all_gather", "chunk", -1)


def scatter_to_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """[s, b, h] -> this rank's [s/tp, b, h]; gradients are all-gathered along the sequence."""
    return _apply(x, group, "chunk", "all_gather", 0)


def gather_from_sequence_parallel_region(x: Tensor, tensor_parallel_output_grad: bool = True,
                                         group: Optional[ProcessGroup] = None) -> Tensor:
    """[s/tp, b, h] -> [s, b, h].

    When the consumer is tensor-parallel (each rank's gradient is a partial sum), the backward
    reduce-scatters; when the consumer is replicated (`tensor_parallel_output_grad=False`), each rank
    already has the full gradient and keeps its own chunk.
    """
    return _apply(x, group, "all_gather", "reduce_scatter" if tensor_parallel_output_grad else "chunk", 0)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum partial [s, b, h] results and keep this rank's [s/tp, b, h]; gradients are all-gathered."""
    return _apply(x, group, "reduce_scatter", "all_gather", 0)
