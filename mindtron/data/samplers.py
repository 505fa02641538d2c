"""Which samples each data-parallel rank reads (Megatron's pretraining sampler).

Iteration after iteration, the global batch is the next `micro_batch_size x dp x micro-batches` samples in
order; within each group of `micro_batch_size x dp` consecutive samples, data-parallel rank r reads
[r x mbs, (r + 1) x mbs). Every layout therefore trains on the same global batch, and resuming from
`consumed_samples` continues exactly where a run stopped.
"""
from __future__ import annotations

from typing import Iterator, List


class MegatronPretrainingSampler:
    """Yields this rank's micro-batches of sample indices, starting after `consumed_samples`."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed samples {consumed_samples} >= dataset size {total_samples}: the data is "
                             "exhausted; use more data or fewer --train-iters")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        span = self.micro_batch_size * self.size
        mine = slice(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size)
        group: List[int] = []
        for index in range(self.consumed_samples, self.total_samples):
            group.append(index)
            if len(group) == span:
                yield group[mine]
                group = []
        if group and not self.drop_last:
            yield group[mine]


class MegatronPretrainingRandomSampler:
    """Megatron's "cyclic" sampler (`--dataloader-type cyclic`): each epoch serves the samples in a fresh
    random order, and each data-parallel rank reads its own part of every global micro-batch.

    Epoch e's order is a permutation seeded with e (numpy's `RandomState(e)`; Megatron uses torch's
    generator, so the orders differ from Megatron's while the rules are the same). With `data_sharding`
    rank r owns a contiguous bucket of the samples and shuffles inside it; without it all samples are
    shuffled and rank r takes every dp-th of them. A trailing remainder of fewer than micro x dp samples is
    left out of every epoch. Resuming from `consumed_samples` continues inside the right epoch.
    """

    def __init__(self, dataset, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, data_sharding: bool = True):
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro batch size and data-parallel size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.dataset, self.total_samples, self.consumed_samples = dataset, total_samples, consumed_samples
        self.micro_batch_size, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size
        self.data_sharding = data_sharding
        self.span = micro_batch_size * data_parallel_size
        self.last_batch_size = total_samples % self.span
        if total_samples < self.span:
            raise ValueError(f"{total_samples} samples cannot fill one global micro-batch of {self.span}")

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        import numpy as np

        active = self.total_samples - self.last_batch_size
        self.epoch = self.consumed_samples // active
        in_epoch = self.consumed_samples % active
        if in_epoch % self.span:
            raise ValueError(f"consumed samples {self.consumed_samples} is not a whole number of global "
                             f"micro-batches ({self.span})")
        order = np.random.RandomState(self.epoch)
        if self.data_sharding:
            bucket = (self.total_samples // self.span) * self.micro_batch_size
            start = self.rank * bucket
            mine = [start + int(x) for x in order.permutation(bucket)[in_epoch // self.size:]]
        else:
            full = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            mine = [int(x) for x in order.permutation(full)[in_epoch:][self.rank::self.size]]
        batch: List[int] = []
        for index in mine:
            batch.append(index)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.span
                yield batch
                batch = []
