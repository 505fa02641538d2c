"""Megatron's fused QKV row order by checkpoint version.

Checkpoint versions 2 and 3 (and every Megatron-Core checkpoint) hold each tensor-parallel shard's rows as
[np_l, 3, hn]: per head its query, key and value rows, which is the grouped layout of `names` with one query
head per group. Older versions ordered the rows of each shard differently, and Megatron reorders them on load:

    version 0: [3, np_l, hn]   all query heads, then all key heads, then all value heads
    version 1: [np_l, hn, 3]   per head, the three projections interleaved row by row

(np_l = heads per tensor-parallel rank, hn = head width). These versions predate grouped-query attention.
"""
from __future__ import annotations

import numpy as np

KNOWN_VERSIONS = (0, 1, 2, 3)


def check_version(version, where: str) -> int:
    """The checkpoint version as an int; ValueError for one Megatron never wrote."""
    try:
        number = float(version)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: checkpoint_version {version!r} is not a number") from None
    if number not in KNOWN_VERSIONS:
        raise ValueError(f"{where}: unknown checkpoint_version {version!r} (Megatron writes 0, 1, 2 or 3)")
    return int(number)


def to_current_order(shard: np.ndarray, version: int, heads_per_rank: int, head_dim: int) -> np.ndarray:
    """One tensor-parallel shard of query_key_value (weight [3 np_l hn, h] or bias) in the version-2 order."""
    if version >= 2:
        return shard
    rest = shard.shape[1:]
    if shard.shape[0] != 3 * heads_per_rank * head_dim:
        raise ValueError(f"query_key_value shard has {shard.shape[0]} rows, expected 3 x {heads_per_rank} heads x "
                         f"{head_dim} for checkpoint version {version}; check --num-attention-heads and --kv-channels")
    if version == 0:
        grouped = shard.reshape((3, heads_per_rank, head_dim) + rest).swapaxes(0, 1)
    else:
        grouped = shard.reshape((heads_per_rank, head_dim, 3) + rest).swapaxes(1, 2)
    return np.ascontiguousarray(grouped).reshape(shard.shape)
