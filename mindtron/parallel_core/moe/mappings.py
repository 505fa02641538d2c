"""Autodiff-aware moves of token rows between ranks when ranks hold different numbers of rows.

| Cell              | forward                                   | backward                                 |
|-------------------|-------------------------------------------|------------------------------------------|
| AllToAllRows      | rows to each rank by send sizes           | the reverse all-to-all                   |
| AllGatherRows     | every rank's rows concatenated (all_gather_v) | reduce-scatter of the gradient rows  |
| ReduceScatterRows | summed rows, this rank's share            | all-gather of the gradient rows          |
| GatherRows        | rows of x picked by an index (a permutation, with repeats) | their gradients added back in place |
| ScatterAddRows    | rows added into a zero buffer at an index  | the buffer's gradient gathered back      |

The last two move rows within a rank. `after(x, anchor)` orders two collectives the same way on every rank. Their backward is written out because MindSpore's CPU gradient of a
gather (a segment sum) is several times slower than the index scatter-add used here.

The row counts change with every batch, so they are inputs (int32 tensors, read on the host) rather than
attributes: a pipeline schedule may run other micro-batches' forwards before this one's backward.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
import mindspore as ms

from mindtron.parallel_core import comm


def after(x: Tensor, anchor: Tensor) -> Tensor:
    """`x`, made to depend on `anchor` (plus 0 x its sum): a collective on the result then runs after the one
    that produced `anchor`, and in the backward before it, on every rank alike, whatever else the rank's
    graph holds (a rank whose experts received no rows has a different graph, but the same collectives)."""
    return x + (anchor.sum() * 0.0).astype(x.dtype)


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


class GatherRows(nn.Cell):
    """x[index] along dim 0: construct(x [n, ...], index [m] int32) -> [m, ...]."""

    def construct(self, x, index):
        return ops.gather(x, index, 0)

    def bprop(self, x, index, out, dout):
        return ops.tensor_scatter_add(ops.zeros_like(x), index.reshape(-1, 1), dout), ops.zeros_like(index)


class ScatterAddRows(nn.Cell):
    """buffer with rows[i] added at row index[i]: construct(rows [m, ...], index [m], buffer [n, ...])."""

    def construct(self, rows, index, buffer):
        return ops.tensor_scatter_add(buffer, index.reshape(-1, 1), rows)

    def bprop(self, rows, index, buffer, out, dout):
        return ops.gather(dout, index, 0), ops.zeros_like(index), dout


_GATHER, _SCATTER = GatherRows(), ScatterAddRows()


def gather_rows(x: Tensor, index) -> Tensor:
    """Rows `index` (numpy or int32 tensor) of x, with the fast backward."""
    return _GATHER(x, index if isinstance(index, Tensor) else Tensor(np.asarray(index, np.int32)))


def scatter_add_rows(rows: Tensor, index, num_rows: int) -> Tensor:
    """[num_rows, ...] zeros with rows[i] added at index[i], with the fast backward."""
    index = index if isinstance(index, Tensor) else Tensor(np.asarray(index, np.int32))
    return _SCATTER(rows, index, ops.zeros((num_rows,) + tuple(rows.shape[1:]), rows.dtype))
