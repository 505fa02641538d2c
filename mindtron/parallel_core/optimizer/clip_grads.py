"""Global gradient norm over the model-parallel ranks and clipping by it (Megatron's clip_grads).

The norm is that of the whole model's gradient, counting every parameter once although model parallelism
spreads and copies parameters over ranks:
- a parameter split over tensor-parallel ranks (`tensor_model_parallel` True) counts its shard on every rank;
- a parameter replicated over the tensor-parallel group (`tensor_model_parallel` False or missing: norm
  weights, row-parallel biases) counts on tensor-parallel rank 0 only;
- a parameter shared between pipeline stages (the word embedding tied to the output layer: attribute
  `shared_embedding` or Megatron's `shared` True, or the name `word_embeddings_for_head.weight`) counts on
  the first pipeline stage only.
- an expert parameter (`allreduce` False) is split over the expert-parallel ranks and, when it is marked
  `tensor_model_parallel`, over the expert tensor-parallel ranks; it counts on every rank that holds a
  different piece (expert tensor-parallel rank 0 for unsplit ones such as expert biases).
Each rank sums the squares of its counted gradients; the sums are added over the tensor x pipeline group
(data-parallel ranks hold the same, already reduced gradients) and, when experts are spread differently
from dense weights (expert parallel, or an expert tensor-parallel size other than tp), the experts' sums
over the expert tensor x expert x pipeline group; the norm is the root of the total.

Clipping multiplies every gradient by max_norm / (norm + 1e-6) when that is below 1.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, jit, ops

from mindtron.parallel_core import comm, cpu_kernels
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core.comm import ProcessGroup

__all__ = ["param_is_not_tensor_parallel_duplicate", "param_is_shared", "param_is_expert", "grads_for_norm",
           "get_grad_norm", "clip_grad_by_total_norm", "clip_grads", "default_model_parallel_group",
           "grad_stats_group", "experts_spread_apart"]

SHARED_HEAD_NAME = "word_embeddings_for_head.weight"


# One compiled call over all gradients instead of a Python loop of small ops per parameter (and, for the
# norm, no concatenated copy of every gradient); on CPU one fused kernel call over all fp32 gradients
# (cpu_kernels.GradientStats) instead.
_map = ops.HyperMap()
_square_sum = ops.MultitypeFuncGraph("mindtron_square_sum")
_abs_max = ops.MultitypeFuncGraph("mindtron_abs_max")
_scale = ops.MultitypeFuncGraph("mindtron_scale")


@_square_sum.register("Tensor")
def _square_sum_one(g):
    g = g.reshape(-1).astype(ms.float32)  # 1-D: MindSpore's CPU reductions over all axes of a 2-D tensor are slow
    return ops.reduce_sum(g * g)


@_abs_max.register("Tensor")
def _abs_max_one(g):
    return ops.reduce_max(ops.abs(g.reshape(-1).astype(ms.float32)))


@_scale.register("Tensor", "Tensor")
def _scale_one(coeff, g):
    return g * coeff.astype(g.dtype)


@jit
def _sum_of_squares(grads):
    return ops.addn(_map(_square_sum, grads))


@jit
def _max_of_abs(grads):
    return ops.stack(_map(_abs_max, grads)).max()


@jit
def _scale_all(grads, coeff):
    return _map(ops.partial(_scale, coeff), grads)


def param_is_not_tensor_parallel_duplicate(param: Parameter, tp_rank: int) -> bool:
    """True when this rank's copy of `param` belongs in the norm: split over tp, or tp rank 0."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def param_is_expert(param: Parameter) -> bool:
    """True for an expert parameter (Megatron marks them `allreduce = False`)."""
    return getattr(param, "allreduce", True) is False


def experts_spread_apart() -> bool:
    """Whether experts live on another grid than dense weights (expert parallel, or expert tp != tp)."""
    if not ps.model_parallel_is_initialized():
        return False
    layout = ps.get_layout()
    return layout.ep > 1 or layout.etp != layout.tp


def grad_stats_group() -> Optional[ProcessGroup]:
    """The group over which all ranks must agree on gradient statistics such as "found inf": the tensor x
    pipeline group, or the whole job when experts are spread over other ranks than dense weights."""
    if experts_spread_apart():
        return comm.world_group()
    return default_model_parallel_group()


def param_is_shared(param: Parameter) -> bool:
    """True for a parameter that also lives on another pipeline stage (the tied word embedding)."""
    name = getattr(param, "name", "") or ""
    return (bool(getattr(param, "shared_embedding", False)) or bool(getattr(param, "shared", False))
            or name == SHARED_HEAD_NAME or name.endswith("." + SHARED_HEAD_NAME))


def _ranks(tp_rank: Optional[int], pp_rank: Optional[int]) -> Tuple[int, int]:
    initialized = ps.model_parallel_is_initialized()
    if tp_rank is None:
        tp_rank = max(ps.get_tensor_model_parallel_rank(), 0) if initialized else 0
    if pp_rank is None:
        pp_rank = max(ps.get_pipeline_model_parallel_rank(), 0) if initialized else 0
    return tp_rank, pp_rank


def grads_for_norm(params: Sequence[Parameter], grads: Sequence[Tensor], tp_rank: Optional[int] = None,
                   pp_rank: Optional[int] = None) -> List[Tensor]:
    """The gradients (aligned with `params`) that this rank contributes to the global norm.

    `tp_rank` / `pp_rank` default to this rank's place in the parallel state (0 when it is not initialized);
    tests pass them to see what another rank would count.
    """
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients; they must be aligned")
    tp_rank, pp_rank = _ranks(tp_rank, pp_rank)
    etp_rank = max(ps.get_expert_tensor_parallel_rank(), 0) if ps.model_parallel_is_initialized() else 0
    return [g for p, g in zip(params, grads)
            if g is not None and param_is_not_tensor_parallel_duplicate(p, etp_rank if param_is_expert(p) else tp_rank)
            and (pp_rank == 0 or not param_is_shared(p))]


def default_model_parallel_group() -> Optional[ProcessGroup]:
    """The tensor x pipeline group from the parallel state; None (no reduction) in an uninitialized world of one."""
    if ps.model_parallel_is_initialized():
        return ps.get_model_parallel_group()
    if comm.get_world_size() == 1:
        return None
    raise ValueError("the gradient norm needs the model-parallel group: call "
                     "parallel_state.initialize_model_parallel() first or pass model_parallel_group")


def _check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if norm_type != 2.0 and not math.isinf(norm_type):
        raise ValueError(f"norm_type must be 2 (L2 norm) or inf (max norm), got {norm_type}")
    return norm_type


def get_grad_norm(params: Sequence[Parameter], grads: Sequence[Tensor],
                  model_parallel_group: Optional[ProcessGroup] = None, norm_type: float = 2.0,
                  tp_rank: Optional[int] = None, pp_rank: Optional[int] = None) -> float:
    """Norm of the whole model's gradient (L2, or the largest |g| with norm_type=inf) over all model-parallel
    ranks; every rank of the group gets the same value. An inf/nan gradient gives an inf/nan norm."""
    norm_type = _check_norm_type(norm_type)
    op = "max" if math.isinf(norm_type) else "sum"
    if model_parallel_group is not None or not experts_spread_apart():
        group = model_parallel_group if model_parallel_group is not None else default_model_parallel_group()
        total = _reduced(_local_stat(grads_for_norm(params, grads, tp_rank, pp_rank), norm_type), group, op)
    else:
        experts = [param_is_expert(p) for p in params]
        dense = grads_for_norm([p for p, e in zip(params, experts) if not e],
                               [g for g, e in zip(grads, experts) if not e], tp_rank, pp_rank)
        expert = grads_for_norm([p for p, e in zip(params, experts) if e],
                                [g for g, e in zip(grads, experts) if e], tp_rank, pp_rank)
        parts = (_reduced(_local_stat(dense, norm_type), default_model_parallel_group(), op),
                 _reduced(_local_stat(expert, norm_type), ps.get_expert_tensor_model_pipeline_parallel_group(), op))
        total = max(parts) if math.isinf(norm_type) else sum(parts)
    return total if math.isinf(norm_type) else total ** 0.5


def _local_stat(counted: List[Tensor], norm_type: float) -> Tensor:
    if not counted:
        return ops.zeros((1,), ms.float32)
    if math.isinf(norm_type):
        return _max_of_abs(ms.mutable(tuple(counted))).reshape(1)
    stats = cpu_kernels.gradient_stats_for(counted)
    if stats is not None:
        return stats.square_sum(*counted)
    # a variable input: the compiled reduction is reused every step
    return _sum_of_squares(ms.mutable(tuple(counted))).reshape(1)


def _reduced(local: Tensor, group: Optional[ProcessGroup], op: str) -> float:
    if group is not None:
        local = comm.all_reduce(local, group, op)
    return float(local.asnumpy()[0])


def clip_grad_by_total_norm(grads: Sequence[Tensor], max_norm: float, total_norm: float) -> List[Tensor]:
    """`grads` scaled by max_norm / (total_norm + 1e-6) when that is below 1, else unchanged.

    A nan total norm leaves the gradients as they are (the comparison is false), as in Megatron; such a
    step is normally skipped by the loss scaler's inf/nan check.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm (--clip-grad / max_grad_norm) must be positive to clip, got {max_norm}")
    coeff = max_norm / (total_norm + 1.0e-6)
    if not coeff < 1.0:
        return list(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    kept = [grads[i] for i in present]
    stats = cpu_kernels.gradient_stats_for(kept)
    if stats is not None:
        scaled = stats.scale(kept, Tensor(np.array([coeff], np.float32)))
    else:
        scaled = _scale_all(ms.mutable(tuple(kept)), Tensor(np.asarray(coeff, np.float32)))
    out = list(grads)
    for i, g in zip(present, scaled):
        out[i] = g
    return out


def clip_grads(params: Sequence[Parameter], grads: Sequence[Tensor], max_norm: float,
               model_parallel_group: Optional[ProcessGroup] = None, norm_type: float = 2.0,
               error_if_nonfinite: bool = False) -> Tuple[List[Tensor], float]:
    """Clip `grads` (aligned with `params`) to a global norm of `max_norm`; returns (grads, norm before).

    `error_if_nonfinite` raises when the norm is inf or nan instead of returning the gradients unclipped.
    """
    total_norm = get_grad_norm(params, grads, model_parallel_group, norm_type)
    if error_if_nonfinite and not math.isfinite(total_norm):
        raise ValueError(f"the global gradient norm is {total_norm} (error_if_nonfinite=True): the gradients "
                         "hold inf or nan; use loss scaling (--fp16 / --loss-scale) or a lower --lr")
    return clip_grad_by_total_norm(grads, max_norm, total_norm), total_norm


def count_zeros(params: Sequence[Parameter], grads: Sequence[Tensor],
                model_parallel_group: Optional[ProcessGroup] = None) -> int:
    """Zero entries of the whole model's gradient over the model-parallel ranks, each replicated or shared
    parameter counted once (Megatron's count_zeros_fp32, for --log-num-zeros-in-grad)."""
    group = model_parallel_group if model_parallel_group is not None else default_model_parallel_group()
    counted = grads_for_norm(params, grads)
    local = (ops.stack([(g == 0).astype(ms.float32).sum() for g in counted]).sum().reshape(1) if counted
             else ops.zeros((1,), ms.float32))
    if group is not None:
        local = comm.all_reduce(local, group)
    return int(round(float(local.asnumpy()[0])))
