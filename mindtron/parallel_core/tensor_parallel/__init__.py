"""Tensor (and sequence) parallelism: region mappings, parallel layers, vocab-parallel cross entropy,
layout-independent initialisation and the model-parallel RNG tracker."""
from mindtron.parallel_core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mindtron.parallel_core.tensor_parallel.initialization import (
    ShardSpec, constant_init_method, full_initial_value, init_method_normal, initialize_parameters,
    scaled_init_method_normal, xavier_uniform_init_method)
from mindtron.parallel_core.tensor_parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, replicated_parameter, split_parameter)
from mindtron.parallel_core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region)
from mindtron.parallel_core.tensor_parallel.random import (
    RNGStatesTracker, RngReplay, dropout, dropout_mask, forward_pass, get_rng_tracker, initial_seed,
    model_parallel_seed)
