"""Small helpers shared by the tensor-parallel layers."""
from __future__ import annotations

from typing import Tuple


def divide(numerator: int, denominator: int, what: str = "value") -> int:
    """numerator / denominator, which must divide exactly; the error names `what`."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator


def vocab_range(global_vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[first, last) vocabulary ids held by `rank` when the vocabulary is split over `world_size` ranks."""
    if global_vocab_size % world_size:
        raise ValueError(f"the vocabulary size {global_vocab_size} is not divisible by the tensor-parallel "
                         f"size {world_size}; pad it (--make-vocab-size-divisible-by)")
    per_rank = global_vocab_size // world_size
    return rank * per_rank, (rank + 1) * per_rank
