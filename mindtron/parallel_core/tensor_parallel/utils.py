"""Small helpers shared by the tensor-parallel layers."""
from __future__ import annotations

from typing import Tuple

from mindspore import Tensor, ops


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


def expand_last(x: Tensor, n: int) -> Tensor:
    """x [..., 1] (or [N]), a float tensor, repeated to [..., n] (or [N, n]) as a materialised tensor.

    On CPU, MindSpore 2.10's elementwise ops are 20-30x slower when one operand is broadcast (a
    [2048, 8192] x [2048, 1] multiply takes ~180 ms, the same-shape multiply ~6 ms), so hot paths repeat
    the small operand first and then combine same-shape tensors. The repeat is an outer product with ones
    (exact, as fast as Tile): MindSpore 2.10 fails to compile a graph ("func_graph->get_return() is null")
    where a custom bprop holding a Tile meets another custom-bprop cell, and the softmax and layer-norm
    bprops use this helper inside compiled layers.
    """
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    return ops.matmul(x, ops.ones((1, n), x.dtype))
