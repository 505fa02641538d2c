"""Mixture of Experts with expert parallelism (Megatron-Core's transformer/moe, for MindSpore).

- config.MoEConfig: the options (Megatron's flag names).
- router.TopKRouter: gating, top-k / group-limited / sinkhorn routing, capacity dropping, aux and z losses,
  expert bias (aux-loss-free balancing, `update_expert_bias`).
- dispatcher: AllGatherDispatcher / AlltoAllDispatcher over the expert-parallel groups.
- experts.Experts: this rank's experts, as a loop or one grouped computation.
- layer.MoELayer: router + dispatcher + experts + shared expert, used by the model's MoE layers.
- aux_loss / metrics: how auxiliary losses reach the backward, and the per-iteration statistics.
"""
from mindtron.parallel_core.moe.aux_loss import (AuxLossAutoScaler, attach_aux_loss, aux_loss_backward_scale,
                                                 counting, replaying, set_aux_loss_backward_scale)
from mindtron.parallel_core.moe.config import MoEConfig, parse_moe_layer_freq
from mindtron.parallel_core.moe.experts import Experts
from mindtron.parallel_core.moe.layer import MoELayer
from mindtron.parallel_core.moe.metrics import MoEMetricsTracker, MoEStepStats, get_moe_metrics_tracker
from mindtron.parallel_core.moe.router import TopKRouter, update_expert_bias

__all__ = [
    "AuxLossAutoScaler", "attach_aux_loss", "aux_loss_backward_scale", "counting", "replaying",
    "set_aux_loss_backward_scale", "MoEConfig", "parse_moe_layer_freq", "Experts", "MoELayer",
    "MoEMetricsTracker", "MoEStepStats", "get_moe_metrics_tracker", "TopKRouter", "update_expert_bias",
]
