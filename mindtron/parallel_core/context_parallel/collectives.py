"""The context-parallel moves as autodiff-aware Cells (forward and backward communication written out).

- RingShift: receive the previous ring rank's tensor, send ours to the next one; the backward sends the
  gradient the opposite way (K/V gradients travel back around the ring). Built on `comm.exchange`
  (pairwise; on CPU a two-rank all-reduce). With two ranks one exchange carries both directions; with more,
  each rank takes part in two pairs per shift, in one global order that cannot deadlock (pairs whose
  sender is even first, then odd ones, for an even ring; pair by pair around an odd one).
- SeqToHeads: the Ulysses all-to-all, sequence split -> head split ([s, b, n, d] -> [u s, b, n / u, d]);
  its backward is the inverse all-to-all. HeadsToSeq is the way back.
- GatherSeq: all-gather along the sequence; backward reduce-scatter.

Each Cell moves one tensor per call, so the backward of one layer runs its collectives in the reverse order
of the forward on every rank (q, k and v travel packed together for the same reason).
"""
from __future__ import annotations

from typing import Sequence

from mindspore import nn

from mindtron.parallel_core import comm


class RingShift(nn.Cell):
    """x from the previous rank of the ring `ranks` (global ranks, ring order); ours goes to the next."""

    def __init__(self, ranks: Sequence[int]):
        super().__init__()
        self.ranks = tuple(int(r) for r in ranks)
        n = len(self.ranks)
        me = comm.get_rank()
        i = self.ranks.index(me)
        self.me, self.next, self.prev = me, self.ranks[(i + 1) % n], self.ranks[(i - 1) % n]
        # my two edges (sender index e -> e + 1), in the global schedule order
        edges = [((i - 1) % n), i]
        key = (lambda e: (e % 2, e)) if n % 2 == 0 else (lambda e: (0, e))
        self.edges = [(self.ranks[e], self.ranks[(e + 1) % n]) for e in sorted(edges, key=key)]

    def _shift(self, x, forward: bool):
        if len(self.ranks) == 2:
            comm.count_sent("cp_p2p", x.size * x.itemsize)
            return comm.exchange(x, self.next if forward else self.prev, x.shape, x.dtype)
        received = None
        for sender, receiver in self.edges:
            if not forward:
                sender, receiver = receiver, sender
            if sender == self.me:
                comm.count_sent("cp_p2p", x.size * x.itemsize)
                comm.exchange(x, receiver, None, x.dtype)
            else:
                received = comm.exchange(None, sender, x.shape, x.dtype)
        return received

    def construct(self, x):
        return self._shift(x, True)

    def bprop(self, x, out, dout):
        return (self._shift(dout, False),)


class SeqToHeads(nn.Cell):
    """Ulysses: [s_l, b, n, d] (sequence split) -> [u s_l, b, n / u, d] (head split) over `group`."""

    def __init__(self, group, head_dim: int = 2):
        super().__init__()
        self.group, self.head_dim = group, head_dim

    def construct(self, x):
        return comm.all_to_all(x, self.group, split_dim=self.head_dim, concat_dim=0)

    def bprop(self, x, out, dout):
        return (comm.all_to_all(dout, self.group, split_dim=0, concat_dim=self.head_dim),)


class HeadsToSeq(nn.Cell):
    """Ulysses back: [u s_l, b, n / u, d] -> [s_l, b, n, d]."""

    def __init__(self, group, head_dim: int = 2):
        super().__init__()
        self.group, self.head_dim = group, head_dim

    def construct(self, x):
        return comm.all_to_all(x, self.group, split_dim=0, concat_dim=self.head_dim)

    def bprop(self, x, out, dout):
        return (comm.all_to_all(dout, self.group, split_dim=self.head_dim, concat_dim=0),)


class GatherSeq(nn.Cell):
    """All-gather along dim 0 over `group` (rank order); the gradient is summed and scattered back."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x):
        return comm.all_gather(x, self.group, 0)

    def bprop(self, x, out, dout):
        return (comm.reduce_scatter(dout, self.group, 0),)


