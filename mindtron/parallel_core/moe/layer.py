"""The MoE layer: route, dispatch, compute the experts, combine, plus the shared expert.

    out [s, b, h] = MoELayer(config, moe, layer_number, activation, gated, shared_mlp)(hidden [s, b, h])

(`[s/tp, b, h]` under sequence parallelism: each tensor-parallel rank routes its own part of the sequence.)
The layer does not know the model: the model passes its activation, whether it is gated (SwiGLU), and
builds the shared expert (a plain MLP of width --moe-shared-expert-intermediate-size) itself. From the model's
config it reads sizes, dtypes, sequence_parallel, add_bias_linear and the init methods (init_method(),
output_layer_init_method()).
Parameter names: router.weight (router.bias, router.expert_bias), experts.dense_h_to_4h.weight,
experts.dense_4h_to_h.weight (and biases), shared_experts.* and shared_experts.gate_weight.
"""
from __future__ import annotations

from typing import Callable, Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe.config import MoEConfig
from mindtron.parallel_core.moe.dispatcher import build_dispatcher
from mindtron.parallel_core.moe.experts import Experts
from mindtron.parallel_core.moe.router import TopKRouter


class MoELayer(nn.Cell):
    """One Mixture-of-Experts MLP (Megatron-Core's MoELayer with TopKRouter and SequentialMLP/GroupedMLP)."""

    def __init__(self, config, moe: MoEConfig, layer_number: int, activation: Callable[[Tensor], Tensor],
                 gated: bool, shared_mlp: Optional[nn.Cell] = None):
        super().__init__()
        self.moe, self.layer_number = moe, layer_number
        ep_group, etp_group = ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group()
        self.router = TopKRouter(config, moe, layer_number)
        self.experts = Experts(config, moe, activation, gated, ep_group, etp_group)
        n_local = self.experts.num_local_experts
        self.local_offset = max(ep_group.rank, 0) * n_local
        self.dispatcher = build_dispatcher(moe.moe_token_dispatcher_type, moe.num_experts, n_local,
                                           self.local_offset, ep_group, etp_group,
                                           ps.get_tensor_and_expert_parallel_group())
        self.shared_experts = shared_mlp
        self.shared_gate = shared_mlp is not None and moe.moe_shared_expert_gate
        if self.shared_gate:  # named shared_experts.gate_weight, as in Megatron
            shared_mlp.gate_weight = tp.replicated_parameter(
                (1, config.hidden_size), config.init_method(),
                config.dtype("params_dtype"), sequence_parallel=bool(config.sequence_parallel))
        self.matmul = ops.MatMul(transpose_b=True)
        if moe.moe_layer_recompute:
            self.recompute()
            self.rng_replay = tp.RngReplay()
        else:
            self.rng_replay = None

    def construct(self, hidden: Tensor) -> Tensor:
        if self.rng_replay is not None:  # recomputed: the recompute pass must draw the same jitter noise
            return self.rng_replay(self._forward, hidden)
        return self._forward(hidden)

    def _forward(self, hidden: Tensor) -> Tensor:
        s, b, h = hidden.shape
        probs, routing_map = self.router(hidden)
        dispatched = self.dispatcher.dispatch(hidden.reshape(s * b, h), probs, routing_map)
        expert_out = self.experts(dispatched.tokens, dispatched.counts, dispatched.probs)
        out = self.dispatcher.combine(expert_out, dispatched).reshape(s, b, h).astype(hidden.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(hidden)
            if self.shared_gate:  # sigmoid(x . gate_weight) per token scales the shared expert
                gate = self.matmul(hidden.reshape(s * b, h).astype(ms.float32),
                                   self.shared_experts.gate_weight.astype(ms.float32))
                shared = (shared.astype(ms.float32) * ops.sigmoid(gate).reshape(s, b, 1)).astype(shared.dtype)
            out = out + shared.astype(out.dtype)
        return out

    def global_expert_index(self, local_index: int) -> int:
        """Global index of this rank's local expert `local_index` (Megatron: ep_rank x E_local + i)."""
        return self.local_offset + local_index
