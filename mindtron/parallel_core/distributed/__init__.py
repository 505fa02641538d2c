"""Gradient reduction across data-parallel ranks (buckets, overlap, sharding for the distributed optimizer)
and the per-parameter gradient fix-ups parallel layouts need."""
from mindtron.parallel_core.distributed.finalize_grads import allreduce_embedding_grads, allreduce_sequence_parallel_grads
from mindtron.parallel_core.distributed.param_and_grad_buffer import (Bucket, GradBuffer, GradBufferConfig,
                                                                        data_parallel_group_of, param_kind)
