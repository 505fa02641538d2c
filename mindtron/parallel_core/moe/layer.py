"""The MoE layer: route, dispatch, compute the experts, combine, plus the shared expert.

    out [s, b, h] = MoELayer(config, moe, layer_number, activation, gated, shared_mlp)(hidden [s, b, h])

(`[s/tp, b, h]` under sequence parallelism: each tensor-parallel rank routes its own part of the sequence.)
The layer does not know the model: the model passes its activation, whether it is gated (SwiGLU), and
builds the shared expert (a plain MLP of width --moe-shared-expert-intermediate-size) itself. From the model's
config it reads sizes, dtypes, sequence_parallel, add_bias_linear and the init methods (init_method(),
output_layer_init_method()).
Parameter names: router.weight (router.bias, router.expert_bias), experts.dense_h_to_4h.weight,
experts.dense_4h_to_h.weight (and biases), shared_experts.* and shared_experts.gate_weight.
With --enable-cold-hot-expert the hot experts' pairs are computed here by replicas (hot_experts.py) and only
the cold experts' pairs are dispatched.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe.config import MoEConfig
from mindtron.parallel_core.moe.dispatcher import build_dispatcher
from mindtron.parallel_core.moe.experts import Experts
from mindtron.parallel_core.moe.hot_experts import HotExperts
from mindtron.parallel_core.moe.mappings import after, gather_rows, scatter_add_rows
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
        self.hot_experts = (HotExperts(moe, n_local, self.local_offset, ep_group) if moe.enable_cold_hot_expert
                            else None)
        if self.hot_experts is not None:
            self.router.capacity_scale = self.hot_experts.capacity_scale()
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
        tokens = hidden.reshape(s * b, h)
        hot_map = None
        if self.hot_experts is not None:
            routing_map, hot_map = self.hot_experts.split(routing_map)
        dispatched = self.dispatcher.dispatch(tokens, probs, routing_map)
        expert_out = self.experts(dispatched.tokens, dispatched.counts, dispatched.probs)
        out = self.dispatcher.combine(expert_out, dispatched)
        if hot_map is not None:
            out = out + self._hot_experts(tokens, probs, hot_map, out)
        out = out.reshape(s, b, h).astype(hidden.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(hidden)
            if self.shared_gate:  # sigmoid(x . gate_weight) per token scales the shared expert
                gate = self.matmul(hidden.reshape(s * b, h).astype(ms.float32),
                                   self.shared_experts.gate_weight.astype(ms.float32))
                shared = (shared.astype(ms.float32) * ops.sigmoid(gate).reshape(s, b, 1)).astype(shared.dtype)
            out = out + shared.astype(out.dtype)
        return out

    def _hot_experts(self, tokens: Tensor, probs: Tensor, hot_map: np.ndarray, cold_out: Tensor) -> Tensor:
        """[T, h]: the pairs of the hot experts computed here by their replicas, summed per token."""
        hot = self.hot_experts
        replicas = hot.replicas(self.experts.local_weights(), after=cold_out)
        column, token_index = np.nonzero(hot_map.T)  # expert by expert, tokens in order
        if token_index.size == 0:  # still use the replicas: every rank's backward exchanges their gradients
            return after(ops.zeros_like(cold_out), replicas.w1)
        T = hot_map.shape[0]
        pair = (hot.hot[column] * T + token_index).astype(np.int32)
        weights = gather_rows(ops.transpose(probs, (1, 0)).reshape(-1), pair)
        out = self.experts.compute(gather_rows(tokens, token_index), hot_map.sum(0), weights, replicas)
        return scatter_add_rows(out, token_index, T).astype(cold_out.dtype)

    def set_hot_experts(self, experts) -> None:
        """Make `experts` (global indices) this layer's hot experts (--enable-cold-hot-expert)."""
        if self.hot_experts is None:
            raise ValueError(f"MoE layer {self.layer_number} has no hot experts: set --enable-cold-hot-expert")
        self.hot_experts.set(experts)
        self.router.capacity_scale = self.hot_experts.capacity_scale()

    def global_expert_index(self, local_index: int) -> int:
        """Global index of this rank's local expert `local_index` (Megatron: ep_rank x E_local + i)."""
        return self.local_offset + local_index
