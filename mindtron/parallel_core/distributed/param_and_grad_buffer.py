"""Gradient buckets: micro-batch gradients accumulated in flat per-dtype buffers and reduced over data
parallel bucket by bucket (Megatron's ParamAndGradBuffer / DistributedDataParallel, applied from outside
the model).

Layout. Parameters are grouped by (gradient dtype, reduction group, kind) and, within a group, laid out
in reverse order (the order backward produces them) into buckets of about `bucket_size` elements. The
kind separates what needs an extra reduction before the data-parallel one:
- "sp": replicated over tensor-parallel ranks but fed only this rank's sequence chunk under sequence
  parallelism (norms, row-parallel biases): summed over the tensor-parallel group first;
- "embedding": the word embedding shared by the first and last pipeline stage: summed over the embedding
  group first. Its buckets are always reduced after the schedule, because the two stages finish their
  backward at different times;
- "dense": everything else.
Expert parameters (`allreduce` False, as Megatron marks them) reduce over the expert-data-parallel group:
the group is chosen per parameter. Every gradient is divided by the data-parallel size (x context
parallel) whatever its group, as Megatron's DDP scales them: an expert's gradient already sums the tokens
of all the data ranks of its expert-parallel group, so averaging over the global batch means dividing by
the whole data-parallel size, not by the expert-data-parallel group's.

No views. A slice of a MindSpore 2.10 tensor is a lazy view that every kernel consuming it copies again
(mindtron's CPU kernels included), so a bucket never hands out views into its buffer: each micro-batch's
gradients are concatenated into the bucket's flat buffer (one add per bucket, not per parameter), the flat
buffer is reduced in one message, and the reduced gradients are split out and made contiguous once per
step. A bucket that no collective touches (one process; a data-parallel group of one with nothing shared
over tensor or pipeline ranks) skips the flat buffer: its gradients stay one tensor per parameter.

Overlap. With `overlap_grad_reduce`, a bucket's reduction is issued as soon as its model chunk has
received its last micro-batch's gradients (with virtual pipeline stages, earlier chunks finish first);
otherwise all buckets are reduced after the last micro-batch. `delay_grad_reduce` (Megatron-Core's
option of that name) holds a finished chunk's reduction back by `pipeline rank` further backward steps, so
that all pipeline ranks issue theirs at about the same time. On a backend whose collectives run
asynchronously the early reductions overlap the remaining backward work; on CPU MindSpore runs them in
order, so only the issue order changes. The result is the same either way.

Distributed optimizer. With `shard=True` each bucket is padded to a multiple of the data-parallel size and
reduce-scattered: data-parallel rank r keeps elements [r * S, (r + 1) * S) of every bucket, S = padded / dp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps

DEFAULT_BUCKET_SIZE = 40_000_000  # elements; document 002's example value


def param_kind(param: Parameter) -> str:
    """"embedding", "sp" or "dense": which reduction a parameter's gradient needs before data parallel."""
    if getattr(param, "shared_embedding", False) and ps.get_pipeline_model_parallel_world_size() > 1:
        return "embedding"
    if getattr(param, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
        return "sp"
    return "dense"


def data_parallel_group_of(param: Parameter):
    """The group a parameter's gradient is averaged over: expert-data-parallel for expert parameters
    (Megatron marks them `allreduce = False`), data-parallel with context parallel folded in otherwise."""
    if getattr(param, "allreduce", True) is False:
        return ps.get_data_modulo_expert_parallel_group(with_context_parallel=True)
    return ps.get_data_parallel_group(with_context_parallel=True)


@dataclass
class Bucket:
    """Parameters whose gradients travel in one message."""

    indices: List[int]                 # positions in the buffer's parameter list, in layout order
    offsets: List[int]                 # start of each parameter in the flat buffer
    numel: int                         # elements holding gradients
    padded_numel: int                  # numel rounded up to a multiple of the group size when sharding
    dtype: ms.Type
    group: object                      # comm.ProcessGroup for the data-parallel reduction
    kind: str
    chunk: int
    data: Optional[Tensor] = None      # accumulated gradients (flat, padded_numel), None before the first add
    parts: Optional[List[Tensor]] = None  # instead of data when no collective touches the bucket: per parameter
    reduced: bool = False
    shard: Optional[Tensor] = None     # this rank's reduced slice (distributed optimizer)

    @property
    def shard_size(self) -> int:
        return self.padded_numel // self.group.size

    def shard_range(self, rank: int) -> Tuple[int, int]:
        return rank * self.shard_size, (rank + 1) * self.shard_size


@dataclass
class GradBufferConfig:
    """Megatron's DDP options."""

    bucket_size: Optional[int] = None          # --ddp-bucket-size; None: DEFAULT_BUCKET_SIZE
    grad_dtype_fp32: bool = True               # --accumulate-allreduce-grads-in-fp32
    overlap_grad_reduce: bool = False          # --overlap-grad-reduce
    delay_grad_reduce: bool = False            # hold a finished chunk back by pipeline-rank backward steps
    shard: bool = False                        # --use-distributed-optimizer: reduce-scatter
    check_for_nan: bool = False                # --check-for-nan-in-loss-and-grad
    pad_to: int = 1                            # enable_mem_align: bucket sizes rounded up to this many elements
    average: bool = True                       # mean over the reduction group; False sums (per-token loss)


class GradBuffer:
    """Buckets over `params` (aligned with `chunks`, the model chunk of each parameter)."""

    def __init__(self, params: Sequence[Parameter], chunks: Sequence[int], config: GradBufferConfig,
                 kind_of: Callable[[Parameter], str] = param_kind,
                 group_of: Callable[[Parameter], object] = data_parallel_group_of):
        if len(params) != len(chunks):
            raise ValueError("GradBuffer: give the model chunk of every parameter")
        self.params, self.chunks, self.config = list(params), list(chunks), config
        size = config.bucket_size or DEFAULT_BUCKET_SIZE
        if size <= 0:
            raise ValueError(f"--ddp-bucket-size must be positive, got {size}")
        self.buckets: List[Bucket] = []
        self._shapes = [tuple(p.shape) for p in self.params]
        members: Dict[tuple, List[int]] = {}  # (chunk, dtype, group ranks, kind) -> parameter indices
        where: Dict[tuple, tuple] = {}
        for i, p in enumerate(self.params):
            dtype = ms.float32 if config.grad_dtype_fp32 else p.dtype
            group = group_of(p)
            key = (self.chunks[i], str(dtype), tuple(group.ranks), kind_of(p))
            members.setdefault(key, []).append(i)
            where[key] = (dtype, group)
        for key, indices in members.items():
            self._make_buckets(list(reversed(indices)), size, *where[key], kind=key[3], chunk=key[0])
        self.bucket_of = {i: b for b in self.buckets for i in b.indices}
        self._delayed: Dict[int, int] = {}  # finished chunk -> backward steps still to wait
        self._nonfinite: List[str] = []  # this step's parameters with NaN/Inf local gradients

    def _make_buckets(self, members: List[int], size: int, dtype, group, kind: str, chunk: int) -> None:
        current: List[int] = []
        count = 0

        def close():
            if not current:
                return
            offsets, start = [], 0
            for i in current:
                offsets.append(start)
                start += int(np.prod(self._shapes[i], dtype=np.int64))
            multiple = self.config.pad_to * (group.size if self.config.shard else 1)
            padded = -(-start // multiple) * multiple
            self.buckets.append(Bucket(list(current), offsets, start, padded, dtype, group, kind, chunk))

        for i in members:
            n = int(np.prod(self._shapes[i], dtype=np.int64))
            if current and count + n > size:
                close()
                current, count = [], 0
            current.append(i)
            count += n
        close()

    # ---- accumulation -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous step's gradients (Megatron's zero_grad_buffer)."""
        for b in self.buckets:
            b.data, b.parts, b.shard, b.reduced = None, None, None, False
        self._delayed.clear()
        self._nonfinite = []

    def add(self, chunk: int, grads: Sequence[Tensor]) -> None:
        """Add one micro-batch's gradients of model chunk `chunk` (aligned with that chunk's parameters)."""
        local = [i for i, c in enumerate(self.chunks) if c == chunk]
        if len(local) != len(grads):
            raise ValueError(f"chunk {chunk} has {len(local)} parameters but {len(grads)} gradients arrived")
        self._tick()
        by_index = dict(zip(local, grads))
        for b in self.buckets:
            if b.chunk != chunk:
                continue
            if self._stays_local(b):
                grads_here = [by_index[i].astype(b.dtype) for i in b.indices]
                b.parts = grads_here if b.parts is None else [a + g for a, g in zip(b.parts, grads_here)]
                continue
            pieces = [by_index[i].reshape(-1).astype(b.dtype) for i in b.indices]
            if b.padded_numel > b.numel:
                pieces.append(ops.zeros((b.padded_numel - b.numel,), b.dtype))
            flat = ops.concat(pieces) if len(pieces) > 1 else pieces[0]
            b.data = flat if b.data is None else b.data + flat

    def _stays_local(self, b: Bucket) -> bool:
        """Whether no collective touches bucket `b`'s gradients (so they need no flat buffer)."""
        if self.config.shard or b.group.size > 1:
            return False
        if b.kind == "sp":
            return ps.get_tensor_model_parallel_world_size() == 1
        if b.kind == "embedding":
            group = ps.get_embedding_group()
            return group is None or group.size == 1
        return True

    def chunk_done(self, chunk: int) -> None:
        """Model chunk `chunk` got its last micro-batch's gradients: with overlap, reduce its buckets now
        (or, with delay_grad_reduce, after pipeline-rank more backward steps)."""
        if not self.config.overlap_grad_reduce:
            return
        wait = max(ps.get_pipeline_model_parallel_rank(), 0) if self.config.delay_grad_reduce else 0
        if wait:
            self._delayed[chunk] = wait
        else:
            self._reduce_chunk(chunk)

    def _tick(self) -> None:
        # one more backward step happened: release the delayed chunks whose wait is over
        for chunk in list(self._delayed):
            self._delayed[chunk] -= 1
            if self._delayed[chunk] <= 0:
                del self._delayed[chunk]
                self._reduce_chunk(chunk)

    def _reduce_chunk(self, chunk: int) -> None:
        for b in self.buckets:
            if b.chunk == chunk and b.kind != "embedding" and not b.reduced:
                self._reduce(b)

    def finish(self) -> None:
        """Reduce every bucket not reduced yet (Megatron's finish_grad_sync)."""
        for b in self.buckets:
            if not b.reduced:
                self._reduce(b)
        if self.config.check_for_nan:
            self._raise_if_nonfinite()

    # ---- reduction ----------------------------------------------------------------------------------
    def _reduce(self, b: Bucket) -> None:
        if b.data is None and b.parts is None:
            raise RuntimeError("a gradient bucket is reduced before any gradient was added to it")
        if self.config.check_for_nan:
            self._check_finite(b)
        # every gradient is divided by the data-parallel size (x cp), experts' too (see the module docstring);
        # with --calculate-per-token-loss (average False) they are only summed
        size = ps.get_data_parallel_world_size(with_context_parallel=True) if self.config.average else 1
        if b.parts is not None:
            b.parts = [g / size for g in b.parts] if size > 1 else b.parts
            b.reduced = True
            return
        data = b.data
        if b.kind == "sp":
            data = comm.all_reduce(data, ps.get_tensor_model_parallel_group())
        elif b.kind == "embedding" and ps.is_rank_in_embedding_group(ignore_virtual=True):
            data = comm.all_reduce(data, ps.get_embedding_group())
        if self.config.shard:
            b.shard = comm.reduce_scatter(data, b.group) if b.group.size > 1 else data
            b.shard = b.shard / size if size > 1 else b.shard
            b.data = None
        else:
            b.data = comm.all_reduce(data, b.group) if b.group.size > 1 else data
            b.data = b.data / size if size > 1 else b.data
        b.reduced = True

    def _check_finite(self, b: Bucket) -> None:
        # recorded, not raised: every rank must first learn that some rank found one (finish)
        if b.parts is not None:
            self._nonfinite += [self.params[i].name for i, g in zip(b.indices, b.parts)
                                if not bool(ops.isfinite(g).all())]
            return
        if bool(ops.isfinite(b.data).all()):
            return
        self._nonfinite += [self.params[i].name for i, off in zip(b.indices, b.offsets)
                            if not bool(ops.isfinite(b.data[off:off + int(np.prod(self._shapes[i],
                                                                                       dtype=np.int64))]).all())]

    def _raise_if_nonfinite(self) -> None:
        # One flag per rank, summed over the world: all ranks raise together, none waits in a collective.
        world, me = comm.get_world_size(), comm.get_rank()
        flags = np.zeros(world, np.float32)
        flags[me] = float(bool(self._nonfinite))
        bad_ranks = np.flatnonzero(comm.all_reduce(Tensor(flags)).asnumpy()) if world > 1 else np.flatnonzero(flags)
        if not len(bad_ranks):
            return
        here = (f"; on this rank (rank {me}) in {', '.join(self._nonfinite)}" if self._nonfinite else "")
        raise RuntimeError(f"found NaN or Inf in the local gradients of rank(s) {bad_ranks.tolist()} before the "
                           f"data-parallel reduction{here} (--check-for-nan-in-loss-and-grad; lower --lr or "
                           "enable loss scaling)")

    # ---- results ------------------------------------------------------------------------------------
    def grads(self) -> List[Tensor]:
        """The reduced gradients, aligned with `params` (after finish(); not with sharding)."""
        if self.config.shard:
            raise RuntimeError("with the distributed optimizer each rank holds gradient shards: use shards()")
        out: List[Optional[Tensor]] = [None] * len(self.params)
        for b in self.buckets:
            if b.parts is not None:
                for i, g in zip(b.indices, b.parts):
                    out[i] = g
                continue
            for i, off in zip(b.indices, b.offsets):
                n = int(np.prod(self._shapes[i], dtype=np.int64))
                out[i] = b.data[off:off + n].reshape(self._shapes[i]).contiguous()  # one copy, not one per use
        return out

    def shard_pieces(self, rank: Optional[int] = None) -> List[Tuple[int, Bucket, int, int, int]]:
        """(parameter index, bucket, start in the parameter, end in the parameter, start in the shard) for
        every parameter that overlaps data-parallel rank `rank`'s shard (default: this rank's)."""
        pieces = []
        for b in self.buckets:
            r = b.group.rank if rank is None else rank
            lo, hi = b.shard_range(r)
            for i, off in zip(b.indices, b.offsets):
                n = int(np.prod(self._shapes[i], dtype=np.int64))
                start, end = max(lo, off), min(hi, off + n)
                if start < end:
                    pieces.append((i, b, start - off, end - off, start - lo))
        return pieces
