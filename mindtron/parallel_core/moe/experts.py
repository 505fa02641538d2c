"""The experts of one rank: E_local MLPs whose weights are stacked, computed one by one or as one group.

Weights (this rank's experts, each split over the expert tensor-parallel group like a dense MLP):
    dense_h_to_4h.weight  [E_local, ffn(x2 for GLU) / etp, h]   ([gate; up] kept together in each shard)
    dense_4h_to_h.weight  [E_local, h, ffn / etp]
    (biases [E_local, ffn(x2)] and [E_local, h] with --add-bias-linear, expert tensor parallel 1 only)
The full stacked tensors are drawn from one generator per parameter name and split over the expert-parallel
ranks by expert (rank r holds experts r * E_local ... (r + 1) * E_local - 1, as Megatron places them), so
every layout starts from the same experts. Expert parameters are marked `allreduce = False`: their
gradients are reduced over the expert-data-parallel group.

Input: the rows routed to this rank's experts, grouped by expert ([N, h], `counts[e]` rows for expert e),
and each row's routing weight. As in Megatron, the weight multiplies the activation before the second
projection (and the second bias); with --moe-apply-probs-on-input it multiplies the input instead. The
output [N, h] is a partial sum over the expert tensor-parallel group when that group has several ranks.

Two ways to compute, the same maths:
- the loop (Megatron's SequentialMLP): one pair of matmuls per expert with tokens;
- grouped (--moe-grouped-gemm, document 001's use_gmm): MindSpore's grouped-matmul kernel on Ascend;
  elsewhere each expert's projections are 2-D matmuls on its rows and all the rest (activation, weighting,
  biases) runs once on the rows of every expert together.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe.config import MoEConfig
from mindtron.parallel_core.tensor_parallel.initialization import ShardSpec, make_parameter
from mindtron.parallel_core.tensor_parallel.layers import add_bias
from mindtron.parallel_core.tensor_parallel.utils import expand_last
from mindtron.parallel_core.moe.mappings import after, gather_rows


def _per_expert(init_method):
    """An init method for stacked expert weights [experts, out, in]: each expert drawn as its own matrix, as
    Megatron initialises each expert's linear layer (fan-in and fan-out are those of one expert)."""
    def init(rng, shape):
        return np.stack([init_method(rng, tuple(shape[1:])) for _ in range(shape[0])])
    return init


def _expert_parameter(full_shape, partition_dim, stride, etp_group, ep_group, init_method, dtype):
    spec = ShardSpec(tuple(full_shape), partition_dim, stride, etp_group.size, max(etp_group.rank, 0),
                     init_method, ep_group.size, max(ep_group.rank, 0))
    param = make_parameter(spec, dtype)
    param.allreduce = False  # Megatron's mark for expert parameters: reduced over expert data parallel
    param.tensor_model_parallel = partition_dim is not None and etp_group.size > 1
    param.partition_dim = -1 if partition_dim is None else partition_dim
    param.partition_stride = stride
    param.sequence_parallel = False
    return param


class Experts(nn.Cell):
    """This rank's experts of one MoE layer."""

    def __init__(self, config, moe: MoEConfig, activation: Callable[[Tensor], Tensor], gated: bool,
                 ep_group, etp_group):
        super().__init__()
        E, h, ffn = moe.num_experts, config.hidden_size, moe.moe_ffn_hidden_size
        self.num_local_experts = E // ep_group.size
        self.activation, self.moe = activation, moe
        params, self.compute_dtype = config.dtype("params_dtype"), config.dtype("compute_dtype")
        width = ffn * (2 if gated else 1)
        init, out_init = _per_expert(config.init_method()), _per_expert(config.output_layer_init_method())
        self.dense_h_to_4h = _Weights(
            _expert_parameter((E, width, h), 1, 2 if gated else 1, etp_group, ep_group, init, params),
            _expert_parameter((E, width), 1, 2 if gated else 1, etp_group, ep_group, tp.constant_init_method(0.0),
                              params) if config.add_bias_linear else None)
        self.dense_4h_to_h = _Weights(
            _expert_parameter((E, h, ffn), 2, 1, etp_group, ep_group, out_init, params),
            _expert_parameter((E, h), None, 1, etp_group, ep_group, tp.constant_init_method(0.0), params)
            if config.add_bias_linear else None)
        self.matmul = ops.MatMul(transpose_b=True)
        self.use_kernel = moe.moe_grouped_gemm and ms.get_context("device_target") == "Ascend"

    def local_weights(self) -> "ExpertWeights":
        """This rank's stacked expert weights."""
        return ExpertWeights(self.dense_h_to_4h.weight, self.dense_4h_to_h.weight, self.dense_h_to_4h.bias,
                             self.dense_4h_to_h.bias)

    def construct(self, tokens: Tensor, counts: np.ndarray, probs: Tensor) -> Tensor:
        """tokens [N, h] grouped by local expert (counts [E_local]), probs [N] -> [N, h]."""
        return self.compute(tokens, counts, probs, self.local_weights())

    def compute(self, tokens: Tensor, counts: np.ndarray, probs: Tensor, weights: "ExpertWeights") -> Tensor:
        """The experts of `weights` (stacked [n, ...], e.g. this rank's, or the replicas of the hot experts) on
        rows grouped by expert (counts [n]), each row weighted by probs [N] -> [N, h]."""
        if self.moe.moe_apply_probs_on_input:
            tokens = tokens * expand_last(probs.astype(tokens.dtype), tokens.shape[-1])
            probs = ops.ones_like(probs)
        if tokens.shape[0] == 0 and not (self.moe.moe_grouped_gemm and self.moe.enable_gmm_safe_tokens):
            # no rows: the result still uses the weights, so that their moves' backward runs here as elsewhere
            return after(tokens, probs)
        if not self.moe.moe_grouped_gemm:
            return self._loop(tokens, counts, probs, weights)
        real = None
        if self.moe.enable_gmm_safe_tokens:
            tokens, counts, probs, real = _add_safe_rows(tokens, counts, probs)
        out = (self._grouped_kernel if self.use_kernel else self._grouped_rows)(tokens, counts, probs, weights)
        return out if real is None else gather_rows(out, real)

    # ---- one expert at a time (Megatron's SequentialMLP) ---------------------------------------------
    def _loop(self, tokens, counts, probs, weights):
        dtype = self.compute_dtype
        w1s = ops.unstack(weights.w1.astype(dtype), 0)
        w2s = ops.unstack(weights.w2.astype(dtype), 0)
        b1s = b2s = None
        if weights.b1 is not None:
            b1s = ops.unstack(weights.b1.astype(dtype), 0)
            b2s = ops.unstack(weights.b2.astype(dtype), 0)
        outputs, start = [], 0
        for e, n in enumerate(int(c) for c in counts):
            if n == 0:
                continue
            x, p = tokens[start:start + n].astype(dtype), probs[start:start + n].astype(ms.float32)
            start += n
            hidden = self.matmul(x, w1s[e])
            if b1s is not None:
                hidden = add_bias(hidden, b1s[e])
            activated = self.activation(hidden).astype(ms.float32)
            # same-shape products: MindSpore's CPU kernels are much slower on broadcast operands
            hidden = (activated * expand_last(p, activated.shape[-1])).astype(dtype)
            out = self.matmul(hidden, w2s[e])
            if b2s is not None:
                bias = ops.tile(b2s[e].astype(ms.float32).expand_dims(0), (n, 1))
                out = out + (bias * expand_last(p, out.shape[-1])).astype(dtype)
            outputs.append(out)
        return ops.concat(outputs, 0).astype(tokens.dtype) if len(outputs) > 1 else outputs[0].astype(tokens.dtype)

    # ---- all local experts at once ------------------------------------------------------------------
    def _grouped_rows(self, tokens, counts, probs, weights):
        """Each expert's two projections on its rows, everything else once on all rows: the activation, the
        weighting and the biases run as a handful of ops on [N, ...] instead of once per expert (on CPU
        MindSpore's batched matmul is slower than its 2-D one, so the projections stay 2-D)."""
        dtype = self.compute_dtype
        counts = np.asarray(counts, np.int64)
        busy = [int(e) for e in np.flatnonzero(counts)]
        sizes = [int(counts[e]) for e in busy]
        w1s = ops.unstack(weights.w1.astype(dtype), 0)
        w2s = ops.unstack(weights.w2.astype(dtype), 0)
        rows = ops.split(tokens.astype(dtype), sizes, 0) if len(busy) > 1 else [tokens.astype(dtype)]
        hidden = _concat([self.matmul(x, w1s[e]) for e, x in zip(busy, rows)])  # [N, ffn(x2)/etp]
        expert_of_row = np.repeat(np.arange(len(counts)), counts)
        if weights.b1 is not None:
            hidden = hidden + gather_rows(weights.b1.astype(dtype), expert_of_row)
        activated = self.activation(hidden).astype(ms.float32)
        row_weights = probs.astype(ms.float32)
        hidden = (activated * expand_last(row_weights, activated.shape[-1])).astype(dtype)
        parts = ops.split(hidden, sizes, 0) if len(busy) > 1 else [hidden]
        out = _concat([self.matmul(a, w2s[e]) for e, a in zip(busy, parts)])  # [N, h]
        if weights.b2 is not None:
            bias = gather_rows(weights.b2.astype(ms.float32), expert_of_row)
            out = out + (bias * expand_last(row_weights, out.shape[-1])).astype(dtype)
        return out.astype(tokens.dtype)

    def _grouped_kernel(self, tokens, counts, probs, weights):  # pragma: no cover - Ascend only
        dtype = self.compute_dtype
        group_list = Tensor(np.cumsum(np.asarray(counts, np.int64)), ms.int64)
        w1 = ops.transpose(weights.w1.astype(dtype), (0, 2, 1))
        w2 = ops.transpose(weights.w2.astype(dtype), (0, 2, 1))
        b1 = None if weights.b1 is None else [weights.b1.astype(dtype)]
        hidden = ops.grouped_matmul([tokens.astype(dtype)], [w1], bias=b1, group_list=group_list,
                                    split_item=3, group_type=0)[0]
        hidden = (self.activation(hidden).astype(ms.float32) * probs.astype(ms.float32).expand_dims(-1)).astype(dtype)
        out = ops.grouped_matmul([hidden], [w2], group_list=group_list, split_item=3, group_type=0)[0]
        if weights.b2 is not None:
            rows = Tensor(np.repeat(np.arange(len(counts)), counts).astype(np.int32))
            bias = ops.gather(weights.b2.astype(ms.float32), rows, 0)
            out = out + (bias * probs.astype(ms.float32).expand_dims(-1)).astype(dtype)
        return out.astype(tokens.dtype)


def _add_safe_rows(tokens: Tensor, counts: np.ndarray, probs: Tensor):
    """Document 001's enable_gmm_safe_tokens: a zero row of weight 0 for every expert without tokens, so no
    group of the grouped matmul is empty. Returns the padded rows, counts, weights and the index of the
    real rows in the result (None when no expert was empty)."""
    counts = np.asarray(counts, np.int64)
    empty = counts == 0
    if not empty.any():
        return tokens, counts, probs, None
    new_counts = np.maximum(counts, 1)
    starts = np.concatenate([[0], np.cumsum(new_counts)[:-1]])
    real = np.concatenate([starts[e] + np.arange(c) for e, c in enumerate(counts)]).astype(np.int32)
    source = np.full(int(new_counts.sum()), tokens.shape[0], np.int64)  # default: the appended zero row
    source[real] = np.arange(tokens.shape[0])
    index = Tensor(source.astype(np.int32))
    rows = gather_rows(ops.concat([tokens, ops.zeros((1, tokens.shape[-1]), tokens.dtype)], 0), index)
    weights = gather_rows(ops.concat([probs, ops.zeros((1,), probs.dtype)], 0), index)
    return rows, new_counts, weights, Tensor(real)


def _concat(parts):
    return parts[0] if len(parts) == 1 else ops.concat(parts, 0)


class ExpertWeights(NamedTuple):
    """Stacked weights of n experts: w1 [n, ffn(x2) / etp, h], w2 [n, h, ffn / etp], biases b1 [n, ffn(x2)]
    and b2 [n, h] or None."""

    w1: Tensor
    w2: Tensor
    b1: Optional[Tensor]
    b2: Optional[Tensor]


class _Weights(nn.Cell):
    """One stacked projection: `weight` and optional `bias` (names as in a dense MLP's linear layer)."""

    def __init__(self, weight, bias: Optional[object]):
        super().__init__()
        self.weight = weight
        self.bias = bias
