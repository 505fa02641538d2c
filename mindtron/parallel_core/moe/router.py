"""Megatron-Core's top-k router: gating, scores, top-k choice, capacity dropping, load balancing.

    probs [T, E], routing_map [T, E] = TopKRouter(config, moe, layer_number)(hidden [s, b, h])

Tokens are the rows of hidden reshaped to [s * b, h] (token t = position * b + sample). `probs` is dense:
the weight of each (token, expert) pair, zero where the token does not go; `routing_map` (a numpy bool
array: routing is decided on the host, it has no gradient) marks the pairs that are computed.

Precision follows Megatron: logits in the router dtype (fp32 weights, so fp32 unless --moe-router-dtype
fp64), scores and weights in fp32. The top-k choice is made on the host from the values (stable order);
the chosen values are gathered back from the tensors, so gradients flow exactly as through torch.topk.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe.aux_loss import attach_aux_loss, counting
from mindtron.parallel_core.moe.config import MoEConfig
from mindtron.parallel_core.moe.metrics import get_moe_metrics_tracker
from mindtron.parallel_core.tensor_parallel.random import EXPERT_PARALLEL_RNG


# --------------------------------------------------------------------------------------------------------
# Host-side choices (no gradient)
# --------------------------------------------------------------------------------------------------------
def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[T, k] indices of each row's k largest values, largest first (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def group_limited_topk_indices(scores: np.ndarray, k: int, num_groups: int, group_topk: int) -> np.ndarray:
    """Megatron's group-limited routing: keep the `group_topk` groups whose top-(k / group_topk) scores sum
    highest, then the top-k experts among them."""
    T, E = scores.shape
    grouped = scores.reshape(T, num_groups, E // num_groups)
    group_scores = -np.sort(-grouped, axis=-1)[..., :k // group_topk].sum(-1)  # [T, groups]
    keep = topk_indices(group_scores, group_topk)
    mask = np.zeros((T, num_groups), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    masked = np.where(np.repeat(mask, E // num_groups, axis=1), scores, -np.inf)
    return topk_indices(masked, k)


def sinkhorn(cost: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """Sinkhorn balancing of exp(cost) (Megatron's S-BASE routing), in float32 like Megatron's."""
    cost = np.exp(cost.astype(np.float32))
    d0 = np.ones(cost.shape[0], np.float32)
    d1 = np.ones(cost.shape[1], np.float32)
    eps, error, d1_old = np.float32(1e-8), 1e9, d1
    while error > tol:
        d0 = (1.0 / d0.shape[0]) / ((d1 * cost).sum(1) + eps)
        d1 = (1.0 / d1.shape[0]) / ((d0[:, None] * cost).sum(0) + eps)
        error = float(np.mean(np.abs(d1_old - d1)))
        d1_old = d1
    return d1 * cost * d0[:, None]


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Megatron's capacity per expert: ceil(tokens x topk / experts x factor)."""
    return math.ceil((num_tokens * topk / num_experts) * capacity_factor)


def capacity_mask(probs: np.ndarray, routing_map: np.ndarray, capacity, policy: str) -> np.ndarray:
    """[T, E] True for the pairs each expert keeps: the `capacity` highest weights ("probs") or the
    `capacity` earliest routed tokens ("position"); everything when capacity covers all tokens. `capacity`
    is one number for every expert or one per expert ([E], hot and cold experts)."""
    T, E = probs.shape
    caps = np.broadcast_to(np.asarray(capacity, np.int64), (E,))
    if (caps > T).all():
        return np.ones((T, E), bool)
    key = probs if policy == "probs" else routing_map.astype(np.float64) - np.arange(T)[:, None] / (T + 1.0)
    order = np.argsort(-key, axis=0, kind="stable")  # [T, E]: each expert's tokens, best first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(T)[:, None], (T, E)), axis=0)
    return rank < caps[None, :]


def expert_capacities(num_tokens: int, num_experts: int, topk: int, capacity_factor: float,
                      scale: Optional[np.ndarray] = None):
    """Each expert's capacity: one number, or with `scale` [E] (1 for hot experts, cold_token_percent for
    cold ones) one per expert, from the factor capacity_factor x scale[e]."""
    if scale is None:
        return expert_capacity(num_tokens, num_experts, topk, capacity_factor)
    return np.array([expert_capacity(num_tokens, num_experts, topk, capacity_factor * float(f)) for f in scale],
                    np.int64)


# --------------------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------------------
class TopKRouter(nn.Cell):
    """Route each token to its top-k experts (Megatron-Core's TopKRouter).

    Parameters: `weight` [E, h] (fp32), `bias` [E] with --add-bias-linear, and with
    --moe-router-enable-expert-bias the non-trainable `expert_bias` [E] that `update_expert_bias` moves
    after every iteration. `layer_number` is the layer's global 1-based number (for logging).
    """

    def __init__(self, config, moe: MoEConfig, layer_number: int):
        super().__init__()
        self.moe, self.layer_number, self.num_layers = moe, layer_number, config.num_layers
        E, h = moe.num_experts, config.hidden_size
        sp = bool(config.sequence_parallel)
        self.weight = tp.replicated_parameter((E, h), config.init_method(), ms.float32, sequence_parallel=sp)
        # Megatron draws the router bias with the weights' init method
        self.bias = (tp.replicated_parameter((E,), tp.init_method_normal(config.init_method_std), ms.float32,
                                             sequence_parallel=sp) if config.add_bias_linear else None)
        self.expert_bias = None
        self.local_tokens_per_expert = np.zeros(E, np.float64)
        if moe.moe_router_enable_expert_bias:
            self.expert_bias = Parameter(Tensor(np.zeros(E, np.float32)), requires_grad=False)
        self.capacity_scale: Optional[np.ndarray] = None  # [E] capacity-factor multipliers (hot/cold experts)
        self._forced_bias: Optional[np.ndarray] = None     # --moe-router-force-biased, a negative std: cached
        self._forced_bias_rng: Optional[np.random.Generator] = None
        self.router_dtype = ms.float64 if moe.moe_router_dtype == "fp64" else ms.float32
        self.global_tokens_per_expert = np.zeros(E, np.float64)  # global_aux_loss: this step's running sum
        self.global_aux_steps = 0
        self.matmul = ops.MatMul(transpose_b=True)
        # --calculate-per-token-loss divides every gradient by the global batch's token count: the attached
        # losses are pre-multiplied by this rank's share of it, so their gradients keep Megatron's scale
        self.per_token_loss = bool(getattr(config, "calculate_per_token_loss", False))

    def _attach(self, x: Tensor, loss: Tensor, num_tokens: int) -> Tensor:
        if self.per_token_loss:
            loss = loss * float(num_tokens * ps.get_tensor_and_context_parallel_group().size)
        elif ps.get_context_parallel_world_size() > 1:
            # each context rank holds its tokens' part of the loss and gradients average over dp x cp: x cp
            # (as the language-model loss), so the parts sum to the whole sequences' auxiliary loss
            loss = loss * float(ps.get_context_parallel_world_size())
        return attach_aux_loss(x, loss)

    # ---- pieces -------------------------------------------------------------------------------------
    def gating(self, hidden: Tensor) -> Tensor:
        """logits [s, b, E] in the router dtype."""
        s, b, h = hidden.shape
        x = hidden.reshape(-1, h).astype(self.router_dtype)
        logits = self.matmul(x, self.weight.astype(self.router_dtype))
        if self.bias is not None:
            logits = logits + self.bias.astype(self.router_dtype)
        return logits.reshape(s, b, -1)

    def _jitter(self, hidden: Tensor) -> Tensor:
        eps = self.moe.moe_input_jitter_eps
        if not self.training or not eps:
            return hidden
        noise = tp.get_rng_tracker().active.uniform(1.0 - eps, 1.0 + eps, size=tuple(hidden.shape))
        return hidden * Tensor(noise.astype(np.float32), hidden.dtype)

    def _random_logits(self, logits: Tensor) -> Tensor:
        # Megatron's benchmarking option: random logits from the expert-parallel stream, gradient straight through
        with tp.get_rng_tracker().fork(EXPERT_PARALLEL_RNG):
            noise = tp.get_rng_tracker().active.standard_normal(tuple(logits.shape))
        return logits + ops.stop_gradient(Tensor(noise, logits.dtype) - logits)

    def _biased_logits(self, logits: Tensor) -> Tensor:
        # Megatron's apply_biased_logits: random logits plus a per-expert bias every rank draws alike (a
        # generator seeded by the global seed and the layer number), kept for the run when std < 0
        std = float(self.moe.moe_router_force_biased)
        logits = self._random_logits(logits)
        if std >= 0 or self._forced_bias is None:
            if self._forced_bias_rng is None:
                self._forced_bias_rng = np.random.default_rng([tp.initial_seed(), self.layer_number, 1280])
            bias = self._forced_bias_rng.normal(0.0, abs(std), self.moe.num_experts)
            if std < 0:
                self._forced_bias = bias
        else:
            bias = self._forced_bias
        return logits + Tensor(bias.astype(np.float32), logits.dtype)

    def _z_loss(self, logits: Tensor) -> Tensor:
        coeff = self.moe.moe_z_loss_coeff
        if coeff is None or not self.training:
            return logits
        tp_cp = ps.get_tensor_and_context_parallel_group()
        coeff = coeff / tp_cp.size  # each tp x cp rank holds part of the tokens: average, not sum
        z_loss = ops.square(ops.logsumexp(logits.astype(ms.float32), -1, False)).mean() * coeff
        if counting():
            get_moe_metrics_tracker().record("z_loss", z_loss / coeff, self.layer_number, self.num_layers)
        return self._attach(logits, z_loss, logits.shape[0])

    def _scores_and_choice(self, logits: Tensor) -> Tuple[Tensor, np.ndarray]:
        """Weights of the chosen experts [T, k] (fp32, differentiable) and their indices [T, k]."""
        moe, k = self.moe, self.moe.moe_router_topk

        def choose(values: np.ndarray) -> np.ndarray:
            if moe.moe_router_group_topk:
                return group_limited_topk_indices(values, k, moe.moe_router_num_groups, moe.moe_router_group_topk)
            return topk_indices(values, k)

        logits32 = logits.astype(ms.float32)
        if moe.moe_router_score_function == "softmax":
            if moe.moe_router_pre_softmax:
                scores = ops.softmax(logits32, -1)
                idx = choose(scores.asnumpy())
                probs = ops.gather_elements(scores, 1, Tensor(idx, ms.int32))
            else:
                idx = choose(logits32.asnumpy())
                probs = ops.softmax(ops.gather_elements(logits32, 1, Tensor(idx, ms.int32)), -1)
        else:
            scores = (ops.sigmoid(logits32) if moe.moe_router_score_function == "sigmoid"
                      else ops.sqrt(ops.softplus(logits32)))
            host = scores.asnumpy()
            if self.expert_bias is not None:
                host = host + self.expert_bias.asnumpy()[None, :]
            idx = choose(host)
            probs = ops.gather_elements(scores, 1, Tensor(idx, ms.int32))
            if k > 1:
                probs = probs / (probs.sum(-1, keepdims=True) + 1e-20)
        if moe.moe_router_topk_scaling_factor:
            probs = probs * moe.moe_router_topk_scaling_factor
        return probs, idx

    def _sinkhorn(self, logits: Tensor) -> Tuple[Tensor, np.ndarray]:
        k = self.moe.moe_router_topk
        logits32 = logits.astype(ms.float32)
        activated = ops.sigmoid(logits32) if k == 1 else ops.softmax(logits32, -1)
        chosen = sinkhorn(logits32.asnumpy()) if self.training else activated.asnumpy()
        idx = topk_indices(chosen, k)
        return ops.gather_elements(activated, 1, Tensor(idx, ms.int32)), idx

    # ---- forward ------------------------------------------------------------------------------------
    def construct(self, hidden: Tensor) -> Tuple[Tensor, np.ndarray]:
        """hidden [s, b, h] -> probs [s*b, E] (dense, fp32) and routing_map [s*b, E] (numpy bool)."""
        moe = self.moe
        s, b, _ = hidden.shape
        logits = self.gating(self._jitter(hidden))
        if moe.moe_router_force_load_balancing:
            logits = self._random_logits(logits)
        if moe.moe_router_force_biased is not None:
            logits = self._biased_logits(logits)
        logits = logits.reshape(s * b, moe.num_experts)
        logits = self._z_loss(logits)
        if moe.moe_router_load_balancing_type == "sinkhorn":
            chosen_probs, idx = self._sinkhorn(logits)
        else:
            chosen_probs, idx = self._scores_and_choice(logits)
        T, E = s * b, moe.num_experts
        onehot = ops.one_hot(Tensor(idx, ms.int32), E, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # [T,k,E]
        probs = (onehot * chosen_probs.expand_dims(-1)).sum(1)  # [T, E]
        routed = np.zeros((T, E), bool)
        np.put_along_axis(routed, idx, True, axis=1)
        routing_map = routed
        if moe.moe_expert_capacity_factor is not None:
            capacity = expert_capacities(T, E, moe.moe_router_topk, moe.moe_expert_capacity_factor,
                                         self.capacity_scale)
            keep = capacity_mask(probs.asnumpy(), routed, capacity, moe.moe_token_drop_policy)
            routing_map = keep if moe.moe_pad_expert_input_to_capacity else (routed & keep)
            probs = probs * Tensor(routing_map.astype(np.float32))
        if self.training:
            probs = self._aux_losses(probs, logits, s, b)
        if counting() and self.training:
            if self.expert_bias is not None:
                self.local_tokens_per_expert += routing_map.sum(0)
            get_moe_metrics_tracker().record_tokens(self.layer_number, routed.sum(0), (routed & routing_map).sum(0))
        return probs, routing_map

    # ---- load balancing -----------------------------------------------------------------------------
    def _aux_scores(self, logits: Tensor) -> Tuple[Tensor, np.ndarray]:
        """Megatron's compute_routing_scores_for_aux_loss: scores over all experts and their plain top-k map."""
        logits32 = logits.astype(ms.float32)
        fn = self.moe.moe_router_score_function
        if fn == "softmax":
            scores = ops.softmax(logits32, -1)
        else:
            scores = ops.sigmoid(logits32) if fn == "sigmoid" else ops.sqrt(ops.softplus(logits32))
            scores = scores / (scores.sum(-1, keepdims=True) + 1e-20)
        idx = topk_indices(scores.asnumpy(), self.moe.moe_router_topk)
        routing = np.zeros(scores.shape, bool)
        np.put_along_axis(routing, idx, True, axis=1)
        return scores, routing

    def _aux_losses(self, probs: Tensor, logits: Tensor, s: int, b: int) -> Tensor:
        moe = self.moe
        coeffs = {kind: moe.aux_loss_coeff(kind) for kind in ("aux_loss", "seq_aux_loss", "global_aux_loss")}
        if not any(c > 0 for c in coeffs.values()):
            return probs
        scores, routing = self._aux_scores(logits)
        E, k = moe.num_experts, moe.moe_router_topk
        tp_cp = ps.get_tensor_and_context_parallel_group()
        track = counting()
        tracker = get_moe_metrics_tracker()
        if coeffs["aux_loss"] > 0:
            counts = _sum_counts(routing.sum(0), tp_cp)
            total = s * b * tp_cp.size
            aux = _switch_loss(scores, counts, total, k, E, coeffs["aux_loss"])
            probs = self._attach(probs, aux, s * b)
            if track:
                tracker.record("load_balancing_loss", aux / coeffs["aux_loss"], self.layer_number, self.num_layers)
        if coeffs["seq_aux_loss"] > 0:
            # each sequence on its own: [s, b * E] columns are (sample, expert) pairs
            seq_scores = scores.reshape(s, b * E)
            counts = _sum_counts(routing.reshape(s, b * E).sum(0), tp_cp)
            aux = _switch_loss(seq_scores, counts, s * tp_cp.size, k, E, coeffs["seq_aux_loss"]) / b
            probs = self._attach(probs, aux, s * b)
            if track:
                tracker.record("seq_load_balancing_loss", aux / coeffs["seq_aux_loss"], self.layer_number,
                               self.num_layers)
        if coeffs["global_aux_loss"] > 0:
            tp_dp_cp = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
            counts = _sum_counts(routing.sum(0), tp_dp_cp)
            if track:
                self.global_tokens_per_expert += counts
                self.global_aux_steps += 1
            average = self.global_tokens_per_expert / max(self.global_aux_steps, 1)
            aux = _switch_loss(scores, average, s * b * tp_dp_cp.size, k, E, coeffs["global_aux_loss"])
            probs = self._attach(probs, aux, s * b)
            if track:
                tracker.record("global_load_balancing_loss", aux / coeffs["global_aux_loss"], self.layer_number,
                               self.num_layers)
        return probs

    def reset_step_statistics(self) -> None:
        """Start a new iteration: forget the counts the expert bias and the global aux loss gathered."""
        self.local_tokens_per_expert[:] = 0.0
        self.global_tokens_per_expert[:] = 0.0
        self.global_aux_steps = 0


def _sum_counts(local: np.ndarray, group) -> np.ndarray:
    if group.size == 1:
        return local.astype(np.float64)
    return comm.all_reduce(Tensor(local.astype(np.float32)), group).asnumpy().astype(np.float64)


def _switch_loss(scores: Tensor, tokens_per_expert: np.ndarray, total_tokens: int, topk: int, num_experts: int,
                 coeff: float) -> Tensor:
    """Switch Transformer's balancing loss: E x coeff / (k x T^2) x sum_e (sum_t scores[t, e]) x n_e."""
    per_expert = scores.sum(0)
    factor = num_experts * coeff / (topk * float(total_tokens) * float(total_tokens))
    return (per_expert * Tensor(tokens_per_expert.astype(np.float32))).sum() * factor


def update_expert_bias(routers, rate: float) -> None:
    """After an iteration: sum the routed-token counts of every router over tp x dp x cp and move each
    expert bias by sign(mean count - count) x rate (Megatron's aux-loss-free balancing); reset the counts.
    Every rank of the model replica's data-parallel world calls it with its routers in the same order."""
    routers = [r for r in routers if r.expert_bias is not None]
    if not routers:
        return
    local = np.stack([r.local_tokens_per_expert for r in routers]).astype(np.float32)
    group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    counts = comm.all_reduce(Tensor(local), group).asnumpy() if group.size > 1 else local
    for router, count in zip(routers, counts):
        offset = count.mean() - count
        updated = router.expert_bias.asnumpy() + np.sign(offset).astype(np.float32) * np.float32(rate)
        ops.assign(router.expert_bias, Tensor(updated.astype(np.float32)))
        router.local_tokens_per_expert[:] = 0.0
