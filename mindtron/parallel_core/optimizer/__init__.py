"""Optimizers (Megatron's AdamW / SGD parameter groups), the lr / weight-decay scheduler, gradient clipping by
the global norm over model-parallel ranks, and loss scalers (constant, dynamic, document 000's adaptive).

    optimizer = get_megatron_optimizer(config.optimizer_config, params)
    scheduler = OptimizerParamScheduler(optimizer, init_lr, max_lr, min_lr, ...)
    grads, norm = clip_grads(params, grads, max_norm)
    optimizer(tuple(grads))     # gradients aligned with `params`
    scheduler.step(increment)
"""
from mindtron.parallel_core.optimizer.clip_grads import (
    clip_grad_by_total_norm, clip_grads, count_zeros, get_grad_norm, grads_for_norm,
    param_is_not_tensor_parallel_duplicate, param_is_shared)
from mindtron.parallel_core.optimizer.loss_scaler import (
    AdaptiveLossScaler, AdaptiveLossScaleUpdateCell, ConstantLossScaler, DynamicLossScaler, LossScaler,
    adaptive_scale_windows, found_inf_in_grads, unscale_grads)
from mindtron.parallel_core.optimizer.optimizer import (
    MegatronAdamW, MegatronSGD, get_megatron_optimizer, get_megatron_param_groups, load_optimizer_state_dict,
    optimizer_state_dict, param_has_decoupled_lr, param_is_not_decayed)
from mindtron.parallel_core.optimizer.optimizer_param_scheduler import OptimizerParamScheduler
from mindtron.parallel_core.optimizer.distrib_optimizer import DistributedOptimizer
from mindtron.parallel_core.optimizer.float16_optimizer import Float16Optimizer, needs_main_copies

__all__ = [
    "get_megatron_optimizer", "get_megatron_param_groups", "param_is_not_decayed", "param_has_decoupled_lr",
    "MegatronAdamW", "MegatronSGD",
    "optimizer_state_dict", "load_optimizer_state_dict", "OptimizerParamScheduler",
    "get_grad_norm", "clip_grad_by_total_norm", "clip_grads", "count_zeros", "grads_for_norm",
    "param_is_not_tensor_parallel_duplicate", "param_is_shared",
    "LossScaler", "ConstantLossScaler", "DynamicLossScaler", "AdaptiveLossScaler", "AdaptiveLossScaleUpdateCell",
    "adaptive_scale_windows", "found_inf_in_grads", "unscale_grads", "DistributedOptimizer",
    "Float16Optimizer", "needs_main_copies",
]
