"""Which context-parallel algorithm each layer uses, and the checks a layout must pass before any process
group is built.

Megatron names the algorithm per layer with `--cp-comm-type` (one value for every layer, or one per layer):
- "p2p": ring attention; K/V blocks travel around the context-parallel ring (document 002's
  `megatron_cp_algo`);
- "a2a": Ulysses; an all-to-all turns the sequence split into a head split for attention and back
  (`ulysses_cp_algo`);
- "allgather": every rank gathers the whole sequence's K/V;
- "a2a+p2p": Ulysses inside groups of `--hierarchical-context-parallel-sizes[0]` consecutive context ranks,
  ring attention across the groups (`hybrid_cp_algo` with `ulysses_degree_in_cp`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

COMM_TYPES = ("p2p", "a2a", "allgather", "a2a+p2p")
ALGO_COMM_TYPE = {"ring": "p2p", "ulysses": "a2a", "hybrid": "a2a+p2p"}


def layer_comm_types(num_layers: int, cp_comm_type: Optional[Sequence[str]] = None,
                     context_parallel_algo: str = "ring") -> List[str]:
    """One comm type per layer: `--cp-comm-type` (one value or one per layer) or else the one document 002's
    `context_parallel_algo` names."""
    if cp_comm_type is None or len(cp_comm_type) == 0:
        if context_parallel_algo not in ALGO_COMM_TYPE:
            raise ValueError(f"--context-parallel-algo {context_parallel_algo!r} is not one of "
                             f"{sorted(ALGO_COMM_TYPE)} (megatron_cp_algo, ulysses_cp_algo, hybrid_cp_algo)")
        types = [ALGO_COMM_TYPE[context_parallel_algo]]
    else:
        types = [str(t) for t in ([cp_comm_type] if isinstance(cp_comm_type, str) else cp_comm_type)]
    for t in types:
        if t not in COMM_TYPES:
            raise ValueError(f"--cp-comm-type {t!r} is not one of {COMM_TYPES}")
    if len(types) == 1:
        return types * num_layers
    if len(types) != num_layers:
        raise ValueError(f"--cp-comm-type gives {len(types)} values; give one for every layer or one for all "
                         f"{num_layers} layers (--num-layers)")
    return types


def ulysses_degree(comm_type: str, cp: int, hierarchical_sizes: Optional[Sequence[int]] = None,
                   ulysses_degree_in_cp: Optional[int] = None) -> int:
    """Context ranks that share a head split (all-to-all group size) under `comm_type`; 1 for ring and
    allgather, cp for Ulysses, the inner hierarchical size for a2a+p2p."""
    if comm_type == "a2a":
        return cp
    if comm_type != "a2a+p2p":
        return 1
    if hierarchical_sizes:
        return int(hierarchical_sizes[0])
    if ulysses_degree_in_cp:
        return int(ulysses_degree_in_cp)
    raise ValueError("--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes (Ulysses size, ring "
                     "size) or --ulysses-degree-in-cp")


def validate_context_parallel(cp: int, tp: int, seq_length: int, num_attention_heads: int,
                              num_query_groups: Optional[int], num_layers: int,
                              cp_comm_type: Optional[Sequence[str]] = None, context_parallel_algo: str = "ring",
                              hierarchical_sizes: Optional[Sequence[int]] = None,
                              ulysses_degree_in_cp: Optional[int] = None,
                              sequence_parallel: bool = False) -> List[str]:
    """Raise ValueError naming the flag to change if the context-parallel settings cannot run; return the
    comm type of every layer. Call before building process groups."""
    if cp < 1:
        raise ValueError(f"--context-parallel-size must be at least 1, got {cp}")
    types = layer_comm_types(num_layers, cp_comm_type, context_parallel_algo)
    if cp == 1:
        return types
    if seq_length % (2 * cp):
        raise ValueError(f"--seq-length {seq_length} must be a multiple of 2 x --context-parallel-size "
                         f"({2 * cp}): each context rank holds two of 2 x cp chunks (causal load balancing)")
    if sequence_parallel and (seq_length // cp) % tp:
        raise ValueError(f"--seq-length {seq_length} / --context-parallel-size {cp} = {seq_length // cp} positions per "
                         f"context rank must be divisible by --tensor-model-parallel-size {tp} under "
                         "--sequence-parallel")
    groups = num_query_groups or num_attention_heads
    if hierarchical_sizes:
        sizes = [int(s) for s in hierarchical_sizes]
        prod = 1
        for s in sizes:
            prod *= s
        if len(sizes) != 2 or prod != cp or min(sizes) < 1:
            raise ValueError(f"--hierarchical-context-parallel-sizes {sizes} must be two sizes (Ulysses, ring) "
                             f"whose product is --context-parallel-size {cp}")
        if ulysses_degree_in_cp is not None and ulysses_degree_in_cp != sizes[0]:
            raise ValueError(f"--ulysses-degree-in-cp {ulysses_degree_in_cp} disagrees with "
                             f"--hierarchical-context-parallel-sizes {sizes} (Ulysses size first)")
    if ulysses_degree_in_cp is not None and (ulysses_degree_in_cp < 1 or cp % ulysses_degree_in_cp):
        raise ValueError(f"--ulysses-degree-in-cp {ulysses_degree_in_cp} must divide --context-parallel-size {cp}")
    for t in sorted(set(types)):
        u = ulysses_degree(t, cp, hierarchical_sizes, ulysses_degree_in_cp)
        if u == 1:
            continue
        flag = "--context-parallel-size" if t == "a2a" else "--ulysses-degree-in-cp / --hierarchical-context-parallel-sizes"
        if num_attention_heads % (u * tp):
            raise ValueError(f"--num-attention-heads {num_attention_heads} is not divisible by the Ulysses degree "
                             f"{u} ({flag}, --cp-comm-type {t}) x --tensor-model-parallel-size {tp}")
        if groups % (u * tp):
            raise ValueError(f"--num-query-groups {groups} is not divisible by the Ulysses degree {u} ({flag}, "
                             f"--cp-comm-type {t}) x --tensor-model-parallel-size {tp}")
    return types
