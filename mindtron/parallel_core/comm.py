"""Every collective mindtron uses, in one place.

MindSpore's collectives depend on the backend. HCCL (Ascend) and NCCL (GPU) have all of them; the CPU
backend (mccl, under msrun) has only a SUM all-reduce in any group plus all-gather and broadcast in the
world group. This module decides once, from the backend, which native ops it may call (`capabilities()`),
and builds everything else from a SUM all-reduce over the group:

- all-gather: each rank writes its shard into its slot of a zero buffer, the buffer is summed;
- reduce-scatter: a full sum, then each rank keeps its own chunk;
- max / min: an all-gather followed by a local max / min;
- broadcast: the source contributes its tensor, the others zeros;
- all-to-all: each rank writes what it sends into its rows of a zero buffer laid out by source rank;
- pairwise exchange: a two-rank group where each side writes its message into its own slot.

Adding zeros is exact in floating point, so the constructions give the same numbers as the native ops;
they cost more bandwidth, which is fine at the sizes CPU runs use. Nothing outside this module calls a
MindSpore collective.

Groups are `ProcessGroup` objects (global ranks + the MindSpore group name). A group of size one never
communicates, so a plain `python script.py` (a world of one process) needs no launcher and no `init()`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

__all__ = [
    "ProcessGroup", "Capabilities", "capabilities", "init_distributed", "is_distributed",
    "get_world_size", "get_rank", "world_group", "new_group", "processes_on_this_host",
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier", "exchange",
    "Collective", "count_sent", "traffic", "reset_traffic",
]

_REDUCE_OPS = ("sum", "max", "min")


@dataclass(frozen=True)
class ProcessGroup:
    """A set of global ranks that communicate together.

    `ranks` are global ranks in group order (index i is the group-local rank i); `name` is the MindSpore
    communication group behind it ("" for a group of one process, which never communicates).
    """

    ranks: tuple
    name: str

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's index in the group (-1 when it is not a member)."""
        me = get_rank()
        return self.ranks.index(me) if me in self.ranks else -1

    def __repr__(self) -> str:
        return f"ProcessGroup(ranks={list(self.ranks)})"


@dataclass(frozen=True)
class Capabilities:
    """Which native MindSpore collectives the current backend runs (the rest are built from all-reduce)."""

    backend: str
    all_reduce_ops: tuple          # reduce ops the native AllReduce supports
    all_gather_any_group: bool     # native AllGather outside the world group
    all_gather_world: bool
    broadcast_any_group: bool
    broadcast_world: bool
    reduce_scatter: bool
    all_to_all_even: bool          # native AlltoAll with equal splits


_NATIVE = Capabilities("native", ("sum", "max", "min"), True, True, True, True, True, True)
_CPU = Capabilities("cpu", ("sum",), False, True, False, True, False, False)
_FALLBACK_ONLY = Capabilities("fallback", ("sum",), False, False, False, False, False, False)


@functools.lru_cache(maxsize=None)
def capabilities() -> Capabilities:
    """The backend's collective capabilities, decided once per process.

    `MINDTRON_COMM_FALLBACK=1` forces the all-reduce constructions everywhere (used by tests to cover them
    on every backend).
    """
    if os.environ.get("MINDTRON_COMM_FALLBACK", "0") == "1":
        return _FALLBACK_ONLY
    if ms.get_context("device_target") in ("Ascend", "GPU"):
        return _NATIVE
    return _CPU


# --------------------------------------------------------------------------------------------------------
# The world and its groups
# --------------------------------------------------------------------------------------------------------
_state = {"initialized": False, "world_size": 1, "rank": 0, "world_name": ""}
_groups: dict = {}  # tuple(ranks) -> ProcessGroup, kept for the life of the process
_primitives: dict = {}  # (kind, group name, extra) -> MindSpore primitive


def is_distributed() -> bool:
    """True when msrun started this process, as a worker or as the scheduler (also for one worker).

    msrun runs the same script as the scheduler (MS_ROLE=MS_SCHED); its `init()` serves the cluster and
    exits the process when the job ends, so it must not carry on as a world of one.
    """
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def init_distributed() -> None:
    """Start the communication backend once; without a launcher this is a world of one process."""
    if _state["initialized"]:
        return
    if is_distributed():
        from mindspore.communication import GlobalComm, get_group_size, get_rank as ms_get_rank, init

        init()
        _state.update(world_size=get_group_size(), rank=ms_get_rank(),
                      world_name=GlobalComm.WORLD_COMM_GROUP)
        from .teardown import arm_at_exit  # after init(): its handler must run before MindSpore's teardown

        arm_at_exit()
    _state["initialized"] = True


def get_world_size() -> int:
    """Number of processes in the job (1 without a launcher)."""
    init_distributed()
    return _state["world_size"]


def get_rank() -> int:
    """This process's global rank (0 without a launcher)."""
    init_distributed()
    return _state["rank"]


@functools.lru_cache(maxsize=None)
def processes_on_this_host() -> int:
    """How many of the job's processes run on this machine (same host name), from one world all-gather."""
    import socket
    import zlib

    if get_world_size() == 1:
        return 1
    # 24 bits: exact in float32, which the all-reduce fallback (MINDTRON_COMM_FALLBACK) sends
    mine = zlib.crc32(socket.gethostname().encode()) & 0xFFFFFF
    hosts = all_gather(Tensor(np.array([mine], np.int32)), world_group()).asnumpy()
    return int((hosts == mine).sum())


def world_group() -> ProcessGroup:
    """The group of all ranks."""
    return new_group(range(get_world_size()))


def new_group(ranks: Sequence[int]) -> ProcessGroup:
    """The group of `ranks` (in this order), created on first use and cached for the process.

    Only members create the MindSpore group; every member must ask for the same groups in the same
    order, as with any collective.
    """
    ranks = tuple(int(r) for r in ranks)
    if len(set(ranks)) != len(ranks) or not ranks:
        raise ValueError(f"a process group needs distinct ranks, got {list(ranks)}")
    world = get_world_size()
    if any(r < 0 or r >= world for r in ranks):
        raise ValueError(f"ranks {list(ranks)} are outside the world of {world} processes")
    if ranks in _groups:
        return _groups[ranks]
    if len(ranks) == 1:
        name = ""
    elif len(ranks) == world and ranks == tuple(range(world)):
        name = _state["world_name"]
    else:
        name = "mindtron_" + "_".join(map(str, ranks))
        if get_rank() in ranks:
            from mindspore.communication import create_group

            create_group(name, list(ranks))
    group = ProcessGroup(ranks, name)
    _groups[ranks] = group
    return group


def _resolve(group: Optional[ProcessGroup]) -> ProcessGroup:
    group = world_group() if group is None else group
    if group.size > 1 and group.rank < 0:
        raise ValueError(f"rank {get_rank()} is not a member of {group}")
    return group


def _is_world(group: ProcessGroup) -> bool:
    return group.size == get_world_size() and group.ranks == tuple(range(group.size))


def _primitive(kind: str, group: ProcessGroup, *extra):
    key = (kind, group.name) + extra
    prim = _primitives.get(key)
    if prim is None:
        if kind == "all_reduce":
            op = {"sum": ops.ReduceOp.SUM, "max": ops.ReduceOp.MAX, "min": ops.ReduceOp.MIN}[extra[0]]
            prim = ops.AllReduce(op=op, group=group.name)
        elif kind == "all_gather":
            prim = ops.AllGather(group=group.name)
        elif kind == "reduce_scatter":
            prim = ops.ReduceScatter(op=ops.ReduceOp.SUM, group=group.name)
        elif kind == "broadcast":
            prim = ops.Broadcast(root_rank=extra[0], group=group.name)
        elif kind == "all_to_all":
            prim = ops.AlltoAll(split_count=group.size, split_dim=extra[0], concat_dim=extra[1],
                                group=group.name)
        else:  # pragma: no cover - programming error
            raise KeyError(kind)
        _primitives[key] = prim
    return prim


_REDUCIBLE = (mstype.float32, mstype.float16)


def _sum(x: Tensor, group: ProcessGroup) -> Tensor:
    # The CPU AllReduce kernel takes float32/float16 only; integer and bool payloads (token counts, split
    # sizes, indices) travel as float32, which is exact below 2**24.
    if x.dtype in _REDUCIBLE:
        return _primitive("all_reduce", group, "sum")(x)
    return _primitive("all_reduce", group, "sum")(x.astype(mstype.float32)).astype(x.dtype)


def _slot_buffer(x: Tensor, index: int, slots: int) -> Tensor:
    """[slots, *x.shape] zeros with `x` written at `index`."""
    zeros_before = ops.zeros((index,) + tuple(x.shape), x.dtype)
    zeros_after = ops.zeros((slots - index - 1,) + tuple(x.shape), x.dtype)
    return ops.concat([zeros_before, ops.expand_dims(x, 0), zeros_after], 0)


def _merge_leading_axis(stacked: Tensor, dim: int) -> Tensor:
    """[n, *shape] -> shape with the n pieces concatenated along `dim`."""
    if dim == 0:
        return stacked.reshape((-1,) + tuple(stacked.shape[2:]))
    n, shape = stacked.shape[0], tuple(stacked.shape[1:])
    perm = tuple(range(1, dim + 1)) + (0,) + tuple(range(dim + 1, len(shape) + 1))
    moved = ops.transpose(stacked, perm)  # [.., n, shape[dim], ..]
    return moved.reshape(shape[:dim] + (n * shape[dim],) + shape[dim + 1:])


def _chunk(x: Tensor, dim: int, index: int, parts: int) -> Tensor:
    size = x.shape[dim] // parts
    return ops.narrow(x, dim, index * size, size)


def _nbytes(x: Tensor) -> int:
    return int(np.prod(x.shape)) * x.itemsize


def _check_dim(x: Tensor, dim: int, what: str) -> int:
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{what}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.ndim


# --------------------------------------------------------------------------------------------------------
# Traffic counters
# --------------------------------------------------------------------------------------------------------
_traffic: dict = {}  # kind -> bytes this rank sent to other ranks


def count_sent(kind: str, nbytes: int) -> None:
    """Add `nbytes` that this rank sends to other ranks under `kind` (what a native collective would move,
    whatever construction runs underneath; the benchmarks read these)."""
    _traffic[kind] = _traffic.get(kind, 0) + int(nbytes)


def traffic() -> dict:
    """Bytes this rank sent, by kind ("all_to_all", and what other modules count), since the last reset."""
    return dict(_traffic)


def reset_traffic() -> None:
    """Set every traffic counter back to zero."""
    _traffic.clear()


# --------------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------------
def all_reduce(x: Tensor, group: Optional[ProcessGroup] = None, op: str = "sum") -> Tensor:
    """Reduce `x` over the group with `op` ("sum", "max" or "min"); every rank gets the result."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op must be one of {_REDUCE_OPS}, got {op!r}")
    group = _resolve(group)
    if group.size == 1:
        return x
    if op == "sum":
        return _sum(x, group)
    if op in capabilities().all_reduce_ops:
        return _primitive("all_reduce", group, op)(x)
    gathered = _gather_stacked(x, group)  # [n, *shape]
    return gathered.max(axis=0) if op == "max" else gathered.min(axis=0)


def _gather_stacked(x: Tensor, group: ProcessGroup) -> Tensor:
    """[n, *x.shape]: every rank's `x`, in group order."""
    caps = capabilities()
    if caps.all_gather_any_group or (caps.all_gather_world and _is_world(group)):
        return _primitive("all_gather", group)(ops.expand_dims(x, 0))
    return _sum(_slot_buffer(x, group.rank, group.size), group)


def all_gather(x: Tensor, group: Optional[ProcessGroup] = None, dim: int = 0) -> Tensor:
    """Concatenate every rank's `x` (all of the same shape) along `dim`, in group order."""
    group = _resolve(group)
    dim = _check_dim(x, dim, "all_gather")
    if group.size == 1:
        return x
    return _merge_leading_axis(_gather_stacked(x, group), dim)


def reduce_scatter(x: Tensor, group: Optional[ProcessGroup] = None, dim: int = 0) -> Tensor:
    """Sum `x` over the group and give rank i the i-th of `group.size` equal chunks along `dim`."""
    group = _resolve(group)
    dim = _check_dim(x, dim, "reduce_scatter")
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter: size {x.shape[dim]} of dim {dim} is not divisible by the "
                         f"group size {group.size}")
    if group.size == 1:
        return x
    if capabilities().reduce_scatter:
        if dim == 0:
            return _primitive("reduce_scatter", group)(x)
        moved = ops.moveaxis(x, dim, 0)
        return ops.moveaxis(_primitive("reduce_scatter", group)(moved), 0, dim)
    return _chunk(_sum(x, group), dim, group.rank, group.size)


def all_gather_v(x: Tensor, sizes: Sequence[int], group: Optional[ProcessGroup] = None) -> Tensor:
    """Concatenate every rank's `x` along dim 0 when ranks hold different numbers of rows (`sizes[i]` rows
    on group rank i, known to every rank)."""
    group = _resolve(group)
    sizes = [int(n) for n in sizes]
    if len(sizes) != group.size or sizes[max(group.rank, 0)] != x.shape[0]:
        raise ValueError(f"all_gather_v: sizes {sizes} do not match the group size {group.size} and this "
                         f"rank's {x.shape[0]} rows")
    if group.size == 1:
        return x
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    row = tuple(x.shape[1:])
    before = ops.zeros((int(offsets[group.rank]),) + row, x.dtype)
    after = ops.zeros((int(offsets[-1] - offsets[group.rank + 1]),) + row, x.dtype)
    return _sum(ops.concat([before, x, after], 0), group)


def reduce_scatter_v(x: Tensor, sizes: Sequence[int], group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum `x` over the group and give rank i its `sizes[i]` rows (dim 0; the rows of all ranks in order)."""
    group = _resolve(group)
    sizes = [int(n) for n in sizes]
    if len(sizes) != group.size or sum(sizes) != x.shape[0]:
        raise ValueError(f"reduce_scatter_v: sizes {sizes} do not match the group size {group.size} and the "
                         f"{x.shape[0]} rows of x")
    if group.size == 1:
        return x
    start = int(sum(sizes[:group.rank]))
    return _sum(x, group)[start:start + sizes[group.rank]]


class Collective(nn.Cell):
    """A floating-point sum all-reduce, all-gather or reduce-scatter over one group, as a Cell.

    The same results as `all_reduce` / `all_gather` / `reduce_scatter`, but every choice (native op or
    all-reduce construction, this rank's slot) is made when the Cell is built, so `construct` is plain
    tensor code that also compiles inside `mindspore.jit` (the tensor-parallel regions of a compiled
    transformer layer use it). `dim` may be negative. Build it on every member of `group`.
    """

    def __init__(self, kind: str, group: ProcessGroup, dim: int = 0):
        super().__init__()
        if kind not in ("all_reduce", "all_gather", "reduce_scatter"):
            raise ValueError(f"Collective kind must be all_reduce, all_gather or reduce_scatter, got {kind!r}")
        group = _resolve(group)
        caps = capabilities()
        self.kind, self.dim, self.size, self.index = kind, dim, group.size, max(group.rank, 0)
        self.communicates = group.size > 1
        # primitives of its own: this Cell may be compiled into graphs, the module's cache serves eager calls
        self.sum = ops.AllReduce(op=ops.ReduceOp.SUM, group=group.name) if self.communicates else None
        self.native_gather = self.communicates and (caps.all_gather_any_group or
                                                    (caps.all_gather_world and _is_world(group)))
        self.gather = ops.AllGather(group=group.name) if self.native_gather else None
        self.native_scatter = self.communicates and caps.reduce_scatter and dim == 0
        self.scatter = ops.ReduceScatter(op=ops.ReduceOp.SUM, group=group.name) if self.native_scatter else None

    def construct(self, x):
        if not self.communicates:
            return x
        if self.kind == "all_reduce":
            return self.sum(x)
        # written out rather than through the module's helpers: a helper function compiled into both a
        # forward and a custom bprop of one graph makes MindSpore 2.10's graph compiler fail
        dim = self.dim if self.dim >= 0 else self.dim + x.ndim
        if self.kind == "all_gather":
            if self.native_gather:
                stacked = self.gather(ops.expand_dims(x, 0))  # [n, *x.shape]
            else:
                shape = (1,) + x.shape
                before = ops.zeros((self.index,) + x.shape, x.dtype)
                after = ops.zeros((self.size - self.index - 1,) + x.shape, x.dtype)
                stacked = self.sum(ops.concat([before, x.reshape(shape), after], 0))
            if dim == 0:
                return stacked.reshape((self.size * x.shape[0],) + x.shape[1:])
            moved = ops.moveaxis(stacked, 0, dim)  # [..., n, x.shape[dim], ...]
            return moved.reshape(x.shape[:dim] + (self.size * x.shape[dim],) + x.shape[dim + 1:])
        if self.native_scatter:
            return self.scatter(x)
        part = x.shape[dim] // self.size
        return ops.narrow(self.sum(x), dim, self.index * part, part)


def broadcast(x: Tensor, src: int, group: Optional[ProcessGroup] = None) -> Tensor:
    """Every rank gets the source's `x`; `src` is a global rank and `x` gives shape and dtype everywhere."""
    group = _resolve(group)
    if group.size == 1:
        return x
    if src not in group.ranks:
        raise ValueError(f"broadcast source rank {src} is not in {group}")
    caps = capabilities()
    if caps.broadcast_any_group or (caps.broadcast_world and _is_world(group)):
        return _primitive("broadcast", group, group.ranks.index(src))((x,))[0]
    return _sum(x if get_rank() == src else ops.zeros_like(x), group)


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Return only when every rank of the group has reached the barrier."""
    group = _resolve(group)
    if group.size > 1:
        _sum(ops.ones((1,), ms.float32), group).asnumpy()


def all_to_all(x: Tensor, group: Optional[ProcessGroup] = None,
               input_split_sizes: Optional[Sequence[int]] = None,
               output_split_sizes: Optional[Sequence[int]] = None,
               split_dim: int = 0, concat_dim: int = 0, split_matrix: Optional[np.ndarray] = None) -> Tensor:
    """Rank i sends its j-th piece of `x` to rank j; each rank concatenates what it receives in rank order.

    Even splits: `x` is cut into `group.size` equal pieces along `split_dim` and the received pieces are
    concatenated along `concat_dim`. Uneven splits (token dispatch): give `input_split_sizes` (rows of `x`
    along dim 0 sent to each rank) and `output_split_sizes` (rows received from each rank); both dims are 0.
    Where every rank already knows what every rank sends (`split_matrix[src, dst]` rows), pass it and the
    construction needs no extra message to agree on the buffer layout.
    """
    group = _resolve(group)
    split_dim, concat_dim = _check_dim(x, split_dim, "all_to_all"), _check_dim(x, concat_dim, "all_to_all")
    n = group.size
    if input_split_sizes is None and output_split_sizes is None:
        if x.shape[split_dim] % n:
            raise ValueError(f"all_to_all: size {x.shape[split_dim]} of split dim {split_dim} is not "
                             f"divisible by the group size {n}; pass input/output_split_sizes")
        if n == 1:
            return x
        count_sent("all_to_all", _nbytes(x) * (n - 1) // n)
        if capabilities().all_to_all_even:
            return _primitive("all_to_all", group, split_dim, concat_dim)(x)
        pieces = ops.stack(ops.chunk(x, n, split_dim), 0)  # [n, *piece]: row j goes to rank j
        sent = _sum(_slot_buffer(pieces, group.rank, n), group)  # [src, dst, *piece]
        return _merge_leading_axis(sent[:, group.rank], concat_dim)
    if input_split_sizes is None or output_split_sizes is None:
        raise ValueError("all_to_all with uneven splits needs both input_split_sizes and output_split_sizes")
    if split_dim != 0 or concat_dim != 0:
        raise ValueError("all_to_all with uneven splits works along dim 0 only")
    send, recv = [int(s) for s in input_split_sizes], [int(s) for s in output_split_sizes]
    if len(send) != n or len(recv) != n:
        raise ValueError(f"all_to_all: split size lists must have {n} entries (the group size), "
                         f"got {len(send)} and {len(recv)}")
    if sum(send) != x.shape[0]:
        raise ValueError(f"all_to_all: input_split_sizes sum to {sum(send)} but x has {x.shape[0]} rows")
    if n == 1:
        return x
    row_bytes = _nbytes(x) // max(x.shape[0], 1)
    count_sent("all_to_all", row_bytes * (sum(send) - send[group.rank]))
    # Every rank's send sizes, so that all ranks agree on the buffer layout: [src, dst] -> rows.
    if split_matrix is not None:
        splits = np.asarray(split_matrix)
    else:
        splits = _sum(_slot_buffer(Tensor(np.array(send, np.float32)), group.rank, n), group).asnumpy()
    if [int(v) for v in splits[:, group.rank]] != recv:
        raise ValueError(f"all_to_all: output_split_sizes {recv} on rank {get_rank()} disagree with what "
                         f"the other ranks send ({splits[:, group.rank].tolist()})")
    src_offsets = np.concatenate([[0], np.cumsum(splits.sum(axis=1))]).astype(int)
    total = int(src_offsets[-1])
    row_shape = tuple(x.shape[1:])
    before = ops.zeros((int(src_offsets[group.rank]),) + row_shape, x.dtype)
    after = ops.zeros((total - int(src_offsets[group.rank + 1]),) + row_shape, x.dtype)
    everything = _sum(ops.concat([before, x, after], 0), group)  # all messages, by source rank
    received = []
    for src in range(n):
        start = int(src_offsets[src] + splits[src, :group.rank].sum())
        received.append(everything[start:start + recv[src]])
    return ops.concat(received, 0)


def exchange(send: Optional[Tensor], peer: int, recv_shape: Optional[Sequence[int]] = None,
             dtype=ms.float32) -> Optional[Tensor]:
    """Send `send` to global rank `peer` and receive a tensor of `recv_shape` from it, at once.

    Both sides call it with mirrored arguments (what one sends, the other expects to receive). Either
    direction may be empty (`send=None` / `recv_shape=None`). Messages use `dtype` on the wire.
    """
    me = get_rank()
    if peer == me:
        raise ValueError(f"exchange: rank {me} cannot exchange with itself")
    pair = new_group(sorted((me, peer)))
    send_flat = ops.zeros((0,), dtype) if send is None else send.reshape(-1).astype(dtype)
    recv_numel = 0 if recv_shape is None else int(np.prod(recv_shape))
    mine, theirs = send_flat.shape[0], recv_numel
    if mine + theirs == 0:
        return None if recv_shape is None else ops.zeros(tuple(recv_shape), dtype)
    caps = capabilities()
    if mine == theirs and (caps.all_gather_any_group or (caps.all_gather_world and _is_world(pair))):
        # both ways with equal sizes (1F1B's steady state, a ring step): a native all-gather moves each
        # message once, where the two-slot sum below moves both slots (measured on CPU, 1 MB each way:
        # 4.9 ms vs 13.7 ms)
        return _gather_stacked(send_flat, pair)[1 - pair.rank].reshape(tuple(recv_shape))
    # The lower rank's message comes first in the two-slot buffer.
    first, second = (mine, theirs) if me < peer else (theirs, mine)
    if me < peer:
        buffer = ops.concat([send_flat, ops.zeros((second,), dtype)])
    else:
        buffer = ops.concat([ops.zeros((first,), dtype), send_flat])
    summed = _sum(buffer, pair)
    if recv_shape is None:
        return None
    message = summed[first:] if me < peer else summed[:first]
    return message.reshape(tuple(recv_shape))
