"""Core attention over a sequence split across the context-parallel group.

Inputs are this rank's part of the sequence (see batch.py): query [s_l, b, np_l, hn], key/value
[s_l, b, ng_l, hn] (not yet expanded to the query heads), s_l = s / cp, holding the global chunks
rank_chunks(cp_rank). The attention is split into blocks of (query chunk, key chunk) pairs, each chunk
s / (2 cp) tokens, and the blocks are merged with an online softmax: per query row a running maximum m, a
running denominator l and an unnormalised output acc,

    m' = max(m, rowmax(S)),  l' = l e^(m - m') + rowsum(e^(S - m')),  acc' = acc e^(m - m') + e^(S - m') V,

and out = acc / l at the end, which is softmax(QK^T) V over all keys. Under the causal mask a key chunk
after the query chunk is skipped, one before it is computed without a mask, and only the diagonal chunk
needs the causal triangle: with the load-balanced chunks that is Megatron's ring pattern (step 0: own
chunks; a block from an earlier rank: every query with the first half of its K/V; from a later rank: the
second half of the queries with all of its K/V). Sliding windows skip chunks entirely outside the window
and mask the ones crossing its edge; a softmax offset ("sink") enters as the starting state (m = offset,
l = 1); an explicit attention mask ([b or 1, 1, s_l, s], this rank's query rows) is applied per block.

Algorithms (settings.py): p2p passes packed K/V around the ring (RingShift), a2a is Ulysses (one
all-to-all of packed Q/K/V from a sequence split to a head split, full attention, one all-to-all back),
allgather gathers K/V over the group, a2a+p2p is Ulysses inside groups of u consecutive context ranks and
the ring across them. Masked scores are -10000, as in the single-process attention, so skipped blocks
contribute exactly what they contribute there (nothing, in fp32).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.context_parallel.batch import chunk_positions, rank_chunks
from mindtron.parallel_core.context_parallel.collectives import GatherSeq, HeadsToSeq, RingShift, SeqToHeads
from mindtron.parallel_core.context_parallel.settings import ulysses_degree

MASKED_SCORE = -10000.0  # Megatron's legacy masked score; also the single-process CoreAttention's


def block_plan(q_chunk: int, k_chunks: List[int], chunk_len: int, window=None) -> Tuple[List[int], Optional[np.ndarray]]:
    """Which of `k_chunks` (positions in the list) query chunk `q_chunk` must attend to under the causal
    mask (and `window` (left, right)), and the boolean mask [L, n L] (True = hidden) of those, or None when
    nothing inside them is hidden."""
    keep = []
    for i, c in enumerate(k_chunks):
        if c > q_chunk:
            continue  # entirely in the future
        if window is not None and window[0] >= 0 and (c + 1) * chunk_len - 1 < q_chunk * chunk_len - window[0]:
            continue  # entirely before the window
        keep.append(i)
    if not keep:
        return keep, None
    qpos = np.arange(q_chunk * chunk_len, (q_chunk + 1) * chunk_len)[:, None]
    kpos = chunk_positions([k_chunks[i] for i in keep], chunk_len)[None, :]
    hidden = kpos > qpos
    if window is not None:
        if window[0] >= 0:
            hidden |= kpos < qpos - window[0]
        if window[1] >= 0:
            hidden |= kpos > qpos + window[1]
    return keep, (hidden if hidden.any() else None)


class OnlineSoftmax:
    """Running (m, l, acc) of one block of query rows; `add` merges a block of scores [b, n, L, k] and its
    values [b, n, k, hn]."""

    def __init__(self, dropout_p: float = 0.0, training: bool = False):
        self.m = self.l = self.acc = None
        self.dropout_p, self.training = dropout_p, training

    def start_with_offset(self, offset: Tensor, shape) -> None:
        """Begin with the sink term: each row's denominator holds exp(offset_head) (offset [n])."""
        b, n, rows = shape
        start = ops.broadcast_to(offset.reshape(1, n, 1, 1).astype(ms.float32), (b, n, rows, 1))
        self.m = ops.stop_gradient(start)
        self.l = ops.exp(start - self.m)  # ones that carry the offset's gradient

    def add(self, scores: Tensor, value: Tensor) -> None:
        block_max = ops.stop_gradient(scores.max(axis=-1, keepdims=True))  # the max only steadies exp
        if self.m is None:
            new_m = block_max
        else:
            new_m = ops.maximum(self.m, block_max)
        probs = ops.exp(scores - new_m)  # [b, n, L, k]
        row_sum = probs.sum(-1, keepdims=True)
        if self.training and self.dropout_p > 0.0:
            with tp.get_rng_tracker().fork():
                probs = tp.dropout(probs, self.dropout_p)
        part = ops.BatchMatMul()(probs.astype(value.dtype), value).astype(ms.float32)  # [b, n, L, hn]
        if self.m is None:
            self.l, self.acc = row_sum, part
        else:
            scale = ops.exp(self.m - new_m)
            self.l = self.l * scale + row_sum
            self.acc = part if self.acc is None else self.acc * scale + part
        self.m = new_m

    def result(self) -> Tensor:
        return self.acc / self.l


class ContextParallelAttention(nn.Cell):
    """softmax(q k^T / sqrt(hn) + causal mask) v for this rank's query chunks, with keys and values of the
    whole sequence brought in by `comm_type` (p2p, a2a, allgather or a2a+p2p)."""

    def __init__(self, config, layer_number: int, comm_type: str, heads_local: int, groups_local: int):
        super().__init__()
        cp_group = ps.get_context_parallel_group()
        self.cp, self.cp_rank = cp_group.size, cp_group.rank
        self.comm_type = comm_type
        self.seq_length = config.seq_length
        self.chunk_len = config.seq_length // (2 * self.cp)
        u = ulysses_degree(comm_type, self.cp, config.hierarchical_context_parallel_sizes,
                           config.ulysses_degree_in_cp)
        self.u = u
        self.heads_l, self.groups_l = heads_local, groups_local
        self.heads_per_group = heads_local // groups_local
        # Ulysses group: u consecutive context ranks; the ring links the ranks at the same place in each group
        first = self.cp_rank - self.cp_rank % u
        ulysses_ranks = cp_group.ranks[first:first + u]
        self.ulysses_group = comm.new_group(ulysses_ranks) if u > 1 else None
        ring_ranks = cp_group.ranks[self.cp_rank % u::u]
        self.ring_size = 1 if comm_type == "allgather" else len(ring_ranks)
        self.ring_index = ring_ranks.index(comm.get_rank()) if comm_type != "allgather" else 0
        self.ring_ranks = ring_ranks
        self.shift = RingShift(ring_ranks) if self.ring_size > 1 else None
        self.gather = GatherSeq(cp_group) if comm_type == "allgather" else None
        self.to_heads = SeqToHeads(self.ulysses_group) if u > 1 else None
        self.to_seq = HeadsToSeq(self.ulysses_group) if u > 1 else None
        # the chunks of each u-group member, in the order the all-to-all concatenates them
        self.q_chunks = self._group_chunks(first // u) if u > 1 else rank_chunks(self.cp_rank, self.cp)
        self.coeff = float(max(1, layer_number)) if config.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(config.kv_channels) * (self.coeff or 1.0)
        self.window = config.layer_window(layer_number)
        self.dropout_p = config.attention_dropout_rate
        self.batch_matmul_t = ops.BatchMatMul(transpose_b=True)
        self.rng_replay = None  # set under selective recompute
        self._masks: dict = {}

    def _group_chunks(self, group_index: int) -> List[int]:
        chunks = []
        for member in range(group_index * self.u, (group_index + 1) * self.u):
            chunks += rank_chunks(member, self.cp)
        return chunks

    def _kv_chunks(self, step: int) -> List[int]:
        """Global chunks of the K/V block this rank holds at ring `step`."""
        if self.comm_type == "allgather":
            return [c for r in range(self.cp) for c in rank_chunks(r, self.cp)]
        source = (self.ring_index - step) % self.ring_size  # ring member whose block arrived
        source_cp_rank = self.ring_ranks[source]
        source_cp_rank = ps.get_context_parallel_group().ranks.index(source_cp_rank)
        if self.u > 1:
            return self._group_chunks(source_cp_rank // self.u)
        return rank_chunks(source_cp_rank, self.cp)

    def _plan(self, qi: int, kv_chunks: List[int]):
        key = (qi, tuple(kv_chunks))
        plan = self._masks.get(key)
        if plan is None:
            keep, hidden = block_plan(self.q_chunks[qi], kv_chunks, self.chunk_len, self.window)
            plan = self._masks[key] = (keep, None if hidden is None else Tensor(hidden[None, None]))
        return plan

    def _expand(self, x: Tensor) -> Tensor:
        """[b, g, k, hn] -> [b, g * heads_per_group, k, hn]."""
        if self.heads_per_group == 1:
            return x
        b, g, k, hn = x.shape
        x = ops.broadcast_to(ops.expand_dims(x, 2), (b, g, self.heads_per_group, k, hn))
        return x.reshape(b, g * self.heads_per_group, k, hn)

    def construct(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor] = None,
                  softmax_offset: Optional[Tensor] = None) -> Tensor:
        """[s_l, b, np_l hn]; masks drawn here under selective recompute are replayed on the recompute pass."""
        if self.rng_replay is not None and self.training and self.dropout_p > 0.0:
            return self.rng_replay(self._forward, query, key, value, attention_mask, softmax_offset)
        return self._forward(query, key, value, attention_mask, softmax_offset)

    def _forward(self, query, key, value, attention_mask, softmax_offset):
        s_l, b, n, hn = query.shape
        g = key.shape[2]
        if self.u > 1:
            # one all-to-all for q, k and v: per destination its heads of each, [s_l, b, u, (n + 2g) / u, hn]
            u = self.u
            packed = ops.concat([query.reshape(s_l, b, u, n // u, hn), key.reshape(s_l, b, u, g // u, hn),
                                 value.reshape(s_l, b, u, g // u, hn)], 3).reshape(s_l, b, -1, hn)
            packed = self.to_heads(packed)  # [u s_l, b, (n + 2 g) / u, hn]
            query, key, value = ops.split(packed, [n // u, g // u, g // u], 2)
            n, g = n // u, g // u
            if attention_mask is not None:  # every member's query rows
                attention_mask = comm.all_gather(attention_mask.astype(ms.float32), self.ulysses_group, 2) > 0.5
            if softmax_offset is not None:  # this rank's share of the heads
                index = self.ulysses_group.rank
                softmax_offset = softmax_offset[index * n:(index + 1) * n]
        q = ops.transpose(query, (1, 2, 0, 3))  # [b, n, s_a, hn]
        kv = ops.concat([key, value], -1)  # [s_a, b, g, 2 hn]: K and V travel together
        if self.gather is not None:
            kv = self.gather(kv)  # [s, b, g, 2 hn]
        L = self.chunk_len
        states = []
        for qi in range(len(self.q_chunks)):
            state = OnlineSoftmax(self.dropout_p, self.training)
            if softmax_offset is not None:
                state.start_with_offset(softmax_offset, (b, n, L))
            states.append(state)
        q_blocks = [q[:, :, i * L:(i + 1) * L] for i in range(len(self.q_chunks))]
        scale = 1.0 / self.norm_factor
        for step in range(self.ring_size):
            if step > 0:
                kv = self.shift(kv)
            kv_chunks = self._kv_chunks(step)
            kv_t = ops.transpose(kv, (1, 2, 0, 3))  # [b, g, k, 2 hn]
            k_all, v_all = kv_t[..., :hn], kv_t[..., hn:]
            for qi, q_blk in enumerate(q_blocks):
                keep, hidden = self._plan(qi, kv_chunks)
                if not keep:
                    continue
                k_sel = self._select(k_all, keep)
                v_sel = self._select(v_all, keep)
                scores = self.batch_matmul_t(q_blk, self._expand(k_sel)) * scale  # [b, n, L, kL]
                scores = scores.astype(ms.float32)  # the running sums need fp32 whatever the softmax dtype
                if self.coeff is not None:
                    scores = scores * self.coeff
                mask = hidden
                if attention_mask is not None:
                    rows = attention_mask[:, :, qi * L:(qi + 1) * L]
                    cols = ops.concat([rows[..., c * L:(c + 1) * L] for c in (kv_chunks[i] for i in keep)], -1)
                    mask = cols if mask is None else ops.logical_or(cols, mask)
                if mask is not None:
                    mask = ops.tile(mask, (b // mask.shape[0], n // mask.shape[1], 1, 1))
                    scores = ops.masked_fill(scores, mask, Tensor(MASKED_SCORE, scores.dtype))
                states[qi].add(scores, self._expand(v_sel))
        out = ops.concat([s.result() for s in states], 2).astype(query.dtype)  # [b, n, s_a, hn]
        out = ops.transpose(out, (2, 0, 1, 3))  # [s_a, b, n, hn]
        if self.u > 1:
            out = self.to_seq(out)  # [s_l, b, n u, hn]
        return out.reshape(s_l, b, -1)

    def _select(self, x: Tensor, keep: List[int]) -> Tensor:
        """The kept chunks of x [b, g, k, d] along the sequence, merged into runs of adjacent chunks."""
        L = self.chunk_len
        if len(keep) == x.shape[2] // L:
            return x
        parts, start = [], keep[0]
        for a, bnext in zip(keep, keep[1:] + [None]):
            if bnext != a + 1:
                parts.append(x[:, :, start * L:(a + 1) * L])
                start = bnext
        return parts[0] if len(parts) == 1 else ops.concat(parts, 2)
