"""Gradient fix-ups that a parallel layout needs before the optimizer step (Megatron: finalize_model_grads).

Under sequence parallelism, parameters that are replicated over tensor-parallel ranks but applied to
only this rank's sequence chunk (norm weights and biases, row-parallel biases) get a partial gradient on
each rank: the true gradient is the sum over the tensor-parallel group. The tied word embedding's two
copies (first and last pipeline stage) need the sum of both gradients. Training does both inside its
gradient buckets (param_and_grad_buffer.py); these per-parameter forms serve schedule-level callers.
"""
from __future__ import annotations

from typing import List, Sequence

from mindspore import Parameter, Tensor

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps


def allreduce_sequence_parallel_grads(params: Sequence[Parameter], grads: Sequence[Tensor]) -> List[Tensor]:
    """`grads` (aligned with `params`) with those of `sequence_parallel` parameters summed over tp."""
    group = ps.get_tensor_model_parallel_group()
    if group.size == 1:
        return list(grads)
    return [comm.all_reduce(g, group) if getattr(p, "sequence_parallel", False) else g
            for p, g in zip(params, grads)]


def allreduce_embedding_grads(params: Sequence[Parameter], grads: Sequence[Tensor]) -> List[Tensor]:
    """Sum the gradients of the word embedding shared by the first and last pipeline stage (parameters
    marked `shared_embedding`) over the embedding group, so both copies take the same update."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group(ignore_virtual=True):
        return list(grads)
    group = ps.get_embedding_group()
    return [comm.all_reduce(g, group) if getattr(p, "shared_embedding", False) else g
            for p, g in zip(params, grads)]
