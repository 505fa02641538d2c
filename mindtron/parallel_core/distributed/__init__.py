"""Gradient reduction across data-parallel ranks and the gradient fix-ups parallel layouts need."""
from mindtron.parallel_core.distributed.finalize_grads import (allreduce_data_parallel_grads, allreduce_embedding_grads,
                                                                 allreduce_sequence_parallel_grads)
