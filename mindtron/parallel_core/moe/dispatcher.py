"""Token dispatchers: bring each routed (token, expert) pair to the rank holding the expert, and back.

Both follow Megatron-Core's dispatchers of the same names and give the same results:

- AllGatherDispatcher: every rank of the expert tensor x expert parallel group (tp-ep) gathers all tokens
  of the group, computes the pairs of its own experts, and a reduce-scatter returns each rank its tokens'
  sums. Simple; moves every token to every rank.
- AlltoAllDispatcher: each rank sorts its pairs by expert and sends each expert-parallel rank exactly the
  rows for its experts (an all-to-all with uneven row counts); with expert tensor parallelism the received
  rows are then gathered over the expert tensor-parallel group. Moves only routed rows.

Routing decisions (which rows go where) are numpy arrays computed on the host; the moves of activations
and weights are differentiable, so the backward sends gradients the reverse way. Inside one expert the
rows keep token order (rank by rank), as in Megatron.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core.moe.mappings import (AllGatherRows, AllToAllRows, ReduceScatterRows, after,
                                                 gather_rows, scatter_add_rows, sizes_tensor)
from mindtron.parallel_core.tensor_parallel import mappings as tp_mappings


@dataclass
class Dispatched:
    """The rows one rank's experts compute, and what is needed to send their results back."""

    tokens: Tensor                 # [N, h] grouped by local expert
    probs: Tensor                  # [N] routing weight of each row
    counts: np.ndarray             # [E_local] rows per local expert
    state: dict                    # dispatcher-specific bookkeeping for combine()


def _expert_major(routing_map: np.ndarray) -> np.ndarray:
    """Token index of every routed pair, expert by expert, tokens in order within an expert."""
    experts, tokens = np.nonzero(routing_map.T)
    return tokens


def _pair_weights(probs: Tensor, routing_map: np.ndarray, columns: slice) -> Tensor:
    """The weight of every routed pair of `columns`, in the order of _expert_major."""
    T = routing_map.shape[0]
    sub = routing_map[:, columns]
    experts, tokens = np.nonzero(sub.T)
    flat = (experts + (columns.start or 0)) * T + tokens
    return gather_rows(ops.transpose(probs, (1, 0)).reshape(-1), flat)


def _unpermute(rows: Tensor, token_index: np.ndarray, num_tokens: int) -> Tensor:
    """Sum each routed pair's result into its token: [pairs, h] -> [num_tokens, h]."""
    return scatter_add_rows(rows, token_index, num_tokens)


class AllGatherDispatcher:
    """Megatron's MoEAllGatherTokenDispatcher over the tp-ep group."""

    def __init__(self, num_experts: int, num_local_experts: int, local_offset: int, tp_ep_group):
        self.E, self.E_local, self.offset, self.group = num_experts, num_local_experts, local_offset, tp_ep_group
        self.gather = tp_mappings.region("gather_from_sequence_parallel", tp_ep_group)
        self.scatter = tp_mappings.region("reduce_scatter_to_sequence_parallel", tp_ep_group)

    def dispatch(self, hidden: Tensor, probs: Tensor, routing_map: np.ndarray) -> Dispatched:
        """hidden [T, h], probs [T, E] (dense), routing_map [T, E] on this rank."""
        if self.gather is not None:
            hidden, probs = self.gather(hidden), self.gather(probs)
            routing_map = comm.all_gather(Tensor(routing_map.astype(np.float32)), self.group).asnumpy() > 0.5
        local = routing_map[:, self.offset:self.offset + self.E_local]
        token_index = _expert_major(local)
        tokens = gather_rows(hidden, token_index)
        weights = _pair_weights(probs, routing_map, slice(self.offset, self.offset + self.E_local))
        return Dispatched(tokens, weights, local.sum(0), {"index": token_index, "rows": routing_map.shape[0]})

    def combine(self, expert_out: Tensor, d: Dispatched) -> Tensor:
        """[N, h] expert results -> [T, h] summed per token, back on the rank the token came from."""
        out = _unpermute(expert_out, d.state["index"], d.state["rows"])
        return out if self.scatter is None else self.scatter(out)


class AlltoAllDispatcher:
    """Megatron's MoEAlltoAllTokenDispatcher: all-to-all over ep, then all-gather over expert tp."""

    def __init__(self, num_experts: int, num_local_experts: int, local_offset: int, ep_group, etp_group,
                 tp_ep_group):
        self.E, self.E_local, self.offset = num_experts, num_local_experts, local_offset
        self.ep, self.etp, self.tp_ep = ep_group, etp_group, tp_ep_group
        self.a2a = AllToAllRows(ep_group) if ep_group.size > 1 else None
        self.gather = AllGatherRows(etp_group) if etp_group.size > 1 else None
        self.scatter = ReduceScatterRows(etp_group) if etp_group.size > 1 else None

    def dispatch(self, hidden: Tensor, probs: Tensor, routing_map: np.ndarray) -> Dispatched:
        ep, etp, E_l = self.ep.size, self.etp.size, self.E_local
        local_counts = routing_map.sum(0).astype(np.int64)  # [E] pairs this rank routes to each expert
        if ep * etp > 1:
            # [ep, etp, E]: tp-ep ranks list expert tp fastest, as Megatron's reshape(ep, tp, E) reads them
            everyone = comm.all_gather(Tensor(local_counts.astype(np.float32)), self.tp_ep)
            everyone = np.rint(everyone.asnumpy()).astype(np.int64).reshape(ep, etp, self.E)
        else:
            everyone = local_counts.reshape(1, 1, self.E)
        to_mine = everyone[:, :, self.offset:self.offset + E_l].transpose(1, 0, 2)  # [etp, ep src, E_local]
        # rows each ep rank sends each ep rank (same expert-tp rank): [src, dst]
        me_tp = max(self.etp.rank, 0)
        send_matrix = everyone[:, me_tp, :].reshape(ep, ep, E_l).sum(-1)
        token_index = _expert_major(routing_map)
        rows = gather_rows(hidden, token_index)
        weights = _pair_weights(probs, routing_map, slice(0, self.E))
        # the weights move after the rows (and their gradients before the rows'), in the same order on every
        # rank: a rank whose experts got no rows never uses its weights but still takes part in their moves
        if self.a2a is not None:
            matrix = sizes_tensor(send_matrix)
            rows = self.a2a(rows, matrix)
            weights = self.a2a(after(weights, rows), matrix)
        per_tp = to_mine.sum(axis=(1, 2))  # rows each expert-tp rank holds after its all-to-all
        if self.gather is not None:
            sizes = sizes_tensor(per_tp)
            rows = self.gather(rows, sizes)
            weights = self.gather(after(weights, rows), sizes)
        # received rows are ordered (tp, src, local expert): regroup them by local expert
        chunk_sizes = to_mine.reshape(-1)
        starts = np.concatenate([[0], np.cumsum(chunk_sizes)[:-1]]).reshape(etp * ep, E_l)
        sizes = to_mine.reshape(etp * ep, E_l)
        order = np.concatenate([np.arange(starts[c, e], starts[c, e] + sizes[c, e])
                                for e in range(E_l) for c in range(etp * ep)]).astype(np.int64)
        if order.size and not np.array_equal(order, np.arange(order.size)):
            rows, weights = gather_rows(rows, order), gather_rows(weights, order)
        state = {"index": token_index, "rows": routing_map.shape[0], "order": order, "send": send_matrix,
                 "per_tp": per_tp}
        return Dispatched(rows, weights, to_mine.sum(axis=(0, 1)), state)

    def combine(self, expert_out: Tensor, d: Dispatched) -> Tensor:
        s = d.state
        out = expert_out
        order = s["order"]
        if order.size and not np.array_equal(order, np.arange(order.size)):
            out = gather_rows(out, np.argsort(order))
        if self.scatter is not None:
            out = self.scatter(out, sizes_tensor(s["per_tp"]))
        if self.a2a is not None:
            out = self.a2a(out, sizes_tensor(s["send"].T))
        return _unpermute(out, s["index"], s["rows"])


def build_dispatcher(kind: str, num_experts: int, num_local_experts: int, local_offset: int, ep_group,
                     etp_group, tp_ep_group):
    """The dispatcher `--moe-token-dispatcher-type` names."""
    if kind == "alltoall":
        return AlltoAllDispatcher(num_experts, num_local_experts, local_offset, ep_group, etp_group, tp_ep_group)
    return AllGatherDispatcher(num_experts, num_local_experts, local_offset, tp_ep_group)
