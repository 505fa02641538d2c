"""Autodiff-aware moves of token rows between ranks when ranks hold different numbers of rows.

| Cell              | forward                                   | backward                                 |
|-------------------|-------------------------------------------|------------------------------------------|
| AllToAllRows      | rows to each rank by send sizes           | the reverse all-to-all                   |
| AllGatherRows     | every rank's rows concatenated (all_gather_v) | reduce-scatter of the gradient rows  |
| ReduceScatterRows | summed rows, this rank's share            | all-gather of the gradient rows          |

The row counts change with every batch, so they are inputs (int32 tensors, read on the host) rather than
attributes: a pipeline schedule may run other micro-batches' forwards before this one's backward.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
import mindspore as ms

from mindtron.parallel_core import comm


def sizes_tensor(values) -> Tensor:
    """Row counts as the int32 tensor these Cells take."""
    return Tensor(np.asarray(values, np.int32).reshape(-1), ms.int32)


class AllToAllRows(nn.Cell):
    """all-to-all of rows over `group`: construct(x, send [n], recv [n]) or with the full [src, dst] matrix
    known to every rank: construct(x, matrix [n * n])."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def _move(self, x, matrix):
        n, me = self.group.size, max(self.group.rank, 0)
        splits = matrix.asnumpy().reshape(n, n)
        return comm.all_to_all(x, self.group, splits[me], splits[:, me], split_matrix=splits)

    def construct(self, x, matrix):
        return self._move(x, matrix)

    def bprop(self, x, matrix, out, dout):
        n = self.group.size
        reverse = sizes_tensor(matrix.asnumpy().reshape(n, n).T)
        return self._move(dout, reverse), ops.zeros_like(matrix)


class AllGatherRows(nn.Cell):
    """all_gather_v over `group`: construct(x, sizes [n])."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x, sizes):
        return comm.all_gather_v(x, sizes.asnumpy(), self.group)

    def bprop(self, x, sizes, out, dout):
        return comm.reduce_scatter_v(dout, sizes.asnumpy(), self.group), ops.zeros_like(sizes)


class ReduceScatterRows(nn.Cell):
    """reduce_scatter_v over `group`: construct(x, sizes [n])."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x, sizes):
        return comm.reduce_scatter_v(x, sizes.asnumpy(), self.group)

    def bprop(self, x, sizes, out, dout):
        return comm.all_gather_v(dout, sizes.asnumpy(), self.group), ops.zeros_like(sizes)
