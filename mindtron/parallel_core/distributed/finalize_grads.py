"""Gradient fix-ups that a parallel layout needs before the optimizer step (Megatron: finalize_model_grads).

Under sequence parallelism, parameters that are replicated over tensor-parallel ranks but applied to
only this rank's sequence chunk (norm weights and biases, row-parallel biases) get a partial gradient on
each rank: the true gradient is the sum over the tensor-parallel group.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps


def allreduce_sequence_parallel_grads(params: Sequence[Parameter], grads: Sequence[Tensor]) -> List[Tensor]:
    """`grads` (aligned with `params`) with those of `sequence_parallel` parameters summed over tp."""
    group = ps.get_tensor_model_parallel_group()
    if group.size == 1:
        return list(grads)
    return [comm.all_reduce(g, group) if getattr(p, "sequence_parallel", False) else g
            for p, g in zip(params, grads)]


def allreduce_data_parallel_grads(grads: Sequence[Tensor], group=None) -> List[Tensor]:
    """Average `grads` over the data-parallel group (context-parallel ranks folded in) in one message.

    The gradients travel as one flat buffer: on CPU every all-reduce is a separate round trip, so one
    large message is much cheaper than one per parameter. (Bucketed, overlapped reduction is the job of
    the gradient-buffer machinery; this is the plain path.)
    """
    group = group or ps.get_data_parallel_group(with_context_parallel=True)
    if group.size == 1:
        return list(grads)
    flat = ops.concat([g.reshape(-1).astype(ms.float32) for g in grads])
    flat = comm.all_reduce(flat, group) / group.size
    out, start = [], 0
    for g in grads:
        n = int(np.prod(g.shape))
        out.append(flat[start:start + n].reshape(g.shape).astype(g.dtype))
        start += n
    return out


def allreduce_embedding_grads(params: Sequence[Parameter], grads: Sequence[Tensor]) -> List[Tensor]:
    """Sum the gradients of the word embedding shared by the first and last pipeline stage (parameters
    marked `shared_embedding`) over the embedding group, so both copies take the same update."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group(ignore_virtual=True):
        return list(grads)
    group = ps.get_embedding_group()
    return [comm.all_reduce(g, group) if getattr(p, "shared_embedding", False) else g
            for p, g in zip(params, grads)]
