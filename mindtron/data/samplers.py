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
