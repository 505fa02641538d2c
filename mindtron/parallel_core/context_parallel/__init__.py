"""Context parallelism: the sequence split over the `cp` group, with ring attention (p2p), Ulysses (a2a),
K/V all-gather and the hybrid of Ulysses and ring (a2a+p2p). See docs/context-parallel.md."""
from mindtron.parallel_core.context_parallel.attention import ContextParallelAttention, OnlineSoftmax, block_plan
from mindtron.parallel_core.context_parallel.batch import (chunk_positions, get_batch_on_this_cp_rank,
                                                           local_positions, rank_chunks, this_rank_positions)
from mindtron.parallel_core.context_parallel.collectives import GatherSeq, HeadsToSeq, RingShift, SeqToHeads
from mindtron.parallel_core.context_parallel.loss import context_parallel_token_mean
from mindtron.parallel_core.context_parallel.settings import (ALGO_COMM_TYPE, COMM_TYPES, layer_comm_types,
                                                              ulysses_degree, validate_context_parallel)

__all__ = ["ContextParallelAttention", "OnlineSoftmax", "block_plan", "chunk_positions", "get_batch_on_this_cp_rank",
           "local_positions", "rank_chunks", "this_rank_positions", "GatherSeq", "HeadsToSeq", "RingShift",
           "SeqToHeads", "context_parallel_token_mean", "ALGO_COMM_TYPE", "COMM_TYPES", "layer_comm_types",
           "ulysses_degree", "validate_context_parallel"]
