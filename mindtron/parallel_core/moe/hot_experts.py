"""Hot experts: the most loaded experts of an MoE layer computed on every expert-parallel rank (documents 000
and 004: MindFormers' cold/hot experts, FasterMoE's shadow experts).

With `enable_cold_hot_expert`, `hot_expert_num` experts of each MoE layer are hot. A (token, expert) pair
routed to a hot expert is computed on the token's own rank, by a replica of that expert, and never enters the
all-to-all; pairs of cold experts are dispatched as usual. Capacities: hot experts keep
`moe_expert_capacity_factor`, cold ones get `moe_expert_capacity_factor x cold_token_percent`.

Replicas are derived, not stored. At each forward, the owner of every hot expert contributes its current
weights and the other expert-parallel ranks zeros; one sum over the expert-parallel group gives every rank
the hot experts' weights ([H, ...], exact: adding zeros). The backward of that sum is the same sum of the
replicas' gradients, which lands on the owner's stacked weight, so the owner's gradient is the sum of its
experts' contributions on all ranks (exactly what the all-to-all would have brought it), the usual expert
data-parallel reduction follows, and only the owner's weights are optimized. Consequences:
- training with hot experts is the same model as without (with cold_token_percent 1 and nothing dropped,
  the same losses to round-off): no replica can drift, no optimizer state is duplicated;
- choosing other hot experts moves nothing: the next forward simply exchanges other experts;
- a checkpoint always holds current experts (only owners hold weights), whenever it is written.
The cost is the exchange itself: the hot experts' weights once per forward and their gradients once per
backward (counted by `comm.traffic()["hot_expert_sync"]` as the bytes a native broadcast / reduce would send).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from mindspore import Tensor, nn, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core.moe.config import MoEConfig
from mindtron.parallel_core.moe.experts import ExpertWeights
from mindtron.parallel_core.moe.mappings import after as ordered_after
from mindtron.parallel_core.moe.mappings import gather_rows


class _SumOverGroup(nn.Cell):
    """Sum over `group` in the forward; its gradient, the sum of the output gradients, in the backward
    (every rank's output depends on every rank's input)."""

    def __init__(self, group, forward_bytes: int, backward_bytes: int):
        super().__init__()
        self.group, self.forward_bytes, self.backward_bytes = group, forward_bytes, backward_bytes

    def construct(self, x):
        comm.count_sent("hot_expert_sync", self.forward_bytes)
        return comm.all_reduce(x, self.group)

    def bprop(self, x, out, dout):
        comm.count_sent("hot_expert_sync", self.backward_bytes)
        return (comm.all_reduce(dout, self.group),)


def choose_hot_experts(tokens_per_expert: np.ndarray, count: int) -> List[int]:
    """The `count` experts with the most tokens (ties: the lower index), in ascending order."""
    order = np.argsort(-np.asarray(tokens_per_expert, np.float64), kind="stable")
    return sorted(int(e) for e in order[:count])


class HotExperts:
    """Which experts of one MoE layer are hot, their capacity factors, and their replicas on this rank."""

    def __init__(self, moe: MoEConfig, num_local_experts: int, local_offset: int, ep_group):
        self.moe, self.E = moe, moe.num_experts
        self.E_local, self.offset, self.group = num_local_experts, local_offset, ep_group
        self.hot = np.arange(moe.hot_expert_num, dtype=np.int64)  # until the monitor measures the load
        self.exchange = _SumOverGroup(ep_group, 0, 0) if ep_group.size > 1 else None

    def set(self, experts: Sequence[int]) -> None:
        """Make `experts` (global indices, hot_expert_num distinct ones) the hot experts."""
        chosen = sorted(int(e) for e in experts)
        if len(chosen) != self.moe.hot_expert_num or len(set(chosen)) != len(chosen) or \
                any(not 0 <= e < self.E for e in chosen):
            raise ValueError(f"hot experts {list(experts)}: need {self.moe.hot_expert_num} distinct experts "
                             f"between 0 and {self.E - 1} (--hot-expert-num)")
        self.hot = np.asarray(chosen, np.int64)

    def capacity_scale(self) -> np.ndarray:
        """[E] multiplier of the capacity factor: 1 for hot experts, cold_token_percent for cold ones."""
        scale = np.full(self.E, float(self.moe.cold_token_percent))
        scale[self.hot] = 1.0
        return scale

    def split(self, routing_map: np.ndarray):
        """(cold [T, E]: the pairs to dispatch, hot [T, H]: the pairs computed here by the replicas)."""
        cold = routing_map.copy()
        cold[:, self.hot] = False
        return cold, routing_map[:, self.hot]

    def replicas(self, local: ExpertWeights, after: Tensor) -> ExpertWeights:
        """The hot experts' weights [H, ...] on every rank, from their owners' stacked weights `local`.

        `after` (any tensor computed earlier in the layer, here the cold experts' combined output) orders the
        exchange after it, and so its backward before that tensor's backward on every rank alike: the
        expert-parallel collectives of the backward then run in the same order everywhere.
        """
        mine = (self.hot >= self.offset) & (self.hot < self.offset + self.E_local)
        index = np.where(mine, self.hot - self.offset, self.E_local).astype(np.int32)  # E_local: a zero row
        tensors = [t for t in local if t is not None]
        rows = []
        for t in tensors:
            padded = ops.concat([t, ops.zeros((1,) + tuple(t.shape[1:]), t.dtype)], 0)
            rows.append(gather_rows(padded, index).reshape(len(self.hot), -1))
        packed = ops.concat(rows, 1) if len(rows) > 1 else rows[0]  # [H, P]
        if self.group.size > 1:
            # as a native broadcast / reduce would: an owner sends its hot experts to the ep - 1 other ranks,
            # and in the backward every other rank sends the owner its gradient of them
            expert_bytes = int(np.prod(packed.shape[1:])) * packed.itemsize
            owned = int(mine.sum())
            self.exchange.forward_bytes = expert_bytes * owned * (self.group.size - 1)
            self.exchange.backward_bytes = expert_bytes * (len(self.hot) - owned)
            packed = self.exchange(ordered_after(packed, after))
        widths = [int(np.prod(t.shape[1:])) for t in tensors]
        parts = ops.split(packed, widths, 1) if len(widths) > 1 else [packed]
        unpacked = iter(p.reshape((len(self.hot),) + tuple(t.shape[1:])) for p, t in zip(parts, tensors))
        return ExpertWeights(*(next(unpacked) if t is not None else None for t in local))
