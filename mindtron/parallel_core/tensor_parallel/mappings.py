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


class _Chunk(nn.Cell):
    """This rank's 1/size of `x` along `dim` (may be negative)."""

    def __init__(self, group: ProcessGroup, dim: int):
        super().__init__()
        self.size, self.index, self.dim = group.size, max(group.rank, 0), dim

    def construct(self, x):
        dim = self.dim if self.dim >= 0 else self.dim + x.ndim
        part = x.shape[dim] // self.size
        return ops.narrow(x, dim, self.index * part, part)


def _move_cell(move: str, group: ProcessGroup, dim: int) -> Optional[nn.Cell]:
    if move == "identity":
        return None
    if move == "chunk":
        return _Chunk(group, dim)
    return comm.Collective(move, group, dim)


class _Region(nn.Cell):
    """A mapping: forward and backward are each one of the moves identity / all_reduce / all_gather /
    reduce_scatter / chunk, built once for the group, so the Cell also compiles inside mindspore.jit."""

    def __init__(self, group: ProcessGroup, forward: str, backward: str, dim: int):
        super().__init__()
        self.forward_cell = _move_cell(forward, group, dim)
        self.backward_cell = _move_cell(backward, group, dim)

    def construct(self, x):
        if self.forward_cell is None:
            return x
        return self.forward_cell(x)

    def bprop(self, x, out, dout):
        if self.backward_cell is None:
            return (dout,)
        return (self.backward_cell(dout),)


# name -> (forward move, backward move, dim)
_MAPPINGS = {
    "copy_to_tensor_model_parallel": ("identity", "all_reduce", 0),
    "reduce_from_tensor_model_parallel": ("all_reduce", "identity", 0),
    "scatter_to_tensor_model_parallel": ("chunk", "all_gather", -1),
    "gather_from_tensor_model_parallel": ("all_gather", "chunk", -1),
    "scatter_to_sequence_parallel": ("chunk", "all_gather", 0),
    "gather_from_sequence_parallel": ("all_gather", "reduce_scatter", 0),
    "gather_from_sequence_parallel_replicated": ("all_gather", "chunk", 0),
    "reduce_scatter_to_sequence_parallel": ("reduce_scatter", "all_gather", 0),
}
_cache: dict = {}


def region(name: str, group: Optional[ProcessGroup] = None) -> Optional[nn.Cell]:
    """The mapping `name` (a key of _MAPPINGS) over `group` as a Cell, or None when the group is one rank
    (the mapping is then the identity). Layers build theirs once, so their construct holds no Python
    bookkeeping and compiles under mindspore.jit."""
    group = _tp_group(group)
    if group.size == 1:
        return None
    key = (group.ranks, name)
    cell = _cache.get(key)
    if cell is None:
        cell = _cache[key] = _Region(group, *_MAPPINGS[name])
    return cell


def _apply(x: Tensor, group: Optional[ProcessGroup], name: str) -> Tensor:
    cell = region(name, group)
    if cell is None:
        return x
    forward, _, dim = _MAPPINGS[name]
    if forward == "chunk":
        size = cell.forward_cell.size
        if x.shape[dim] % size:
            raise ValueError(f"dimension {dim} of size {x.shape[dim]} cannot be split evenly over the "
                             f"{size} tensor-parallel ranks")
    return cell(x)


def copy_to_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Enter a tensor-parallel region with a replicated input: identity, gradients all-reduced."""
    return _apply(x, group, "copy_to_tensor_model_parallel")


def reduce_from_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce, gradient passes through."""
    return _apply(x, group, "reduce_from_tensor_model_parallel")


def scatter_to_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Keep this rank's chunk of the last dimension; gradients are all-gathered."""
    return _apply(x, group, "scatter_to_tensor_model_parallel")


def gather_from_tensor_model_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Concatenate every rank's chunk along the last dimension; gradients are split back."""
    return _apply(x, group, "gather_from_tensor_model_parallel")


def scatter_to_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """[s, b, h] -> this rank's [s/tp, b, h]; gradients are all-gathered along the sequence."""
    return _apply(x, group, "scatter_to_sequence_parallel")


def gather_from_sequence_parallel_region(x: Tensor, tensor_parallel_output_grad: bool = True,
                                         group: Optional[ProcessGroup] = None) -> Tensor:
    """[s/tp, b, h] -> [s, b, h].

    When the consumer is tensor-parallel (each rank's gradient is a partial sum), the backward
    reduce-scatters; when the consumer is replicated (`tensor_parallel_output_grad=False`), each rank
    already has the full gradient and keeps its own chunk.
    """
    return _apply(x, group, "gather_from_sequence_parallel" if tensor_parallel_output_grad
                  else "gather_from_sequence_parallel_replicated")


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum partial [s, b, h] results and keep this rank's [s/tp, b, h]; gradients are all-gathered."""
    return _apply(x, group, "reduce_scatter_to_sequence_parallel")
