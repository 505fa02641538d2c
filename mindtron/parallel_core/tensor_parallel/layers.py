"""Tensor-parallel linear layers and the vocabulary-parallel embedding (Megatron-Core's layouts and names).

Weights are stored as Megatron stores them, [output, input], so checkpoints map one to one:
- ColumnParallelLinear splits the output features: rank r holds rows r of W = [W_0; ...; W_{p-1}].
- RowParallelLinear splits the input features: rank r holds columns r of W = [W_0, ..., W_{p-1}].
- VocabParallelEmbedding splits the vocabulary rows.

Each parameter carries a ShardSpec (see initialization.py) and Megatron's attributes
`tensor_model_parallel`, `partition_dim`, `partition_stride`; parameters that are replicated across the
tensor-parallel group but see only this rank's sequence chunk under sequence parallelism have
`sequence_parallel = True`: their gradients must be summed over the tensor-parallel group.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindtron.parallel_core import cpu_kernels
from mindtron.parallel_core.comm import ProcessGroup
from mindtron.parallel_core.tensor_parallel import mappings
from mindtron.parallel_core.tensor_parallel.initialization import (
    InitMethod, ShardSpec, constant_init_method, init_method_normal, make_parameter)
from mindtron.parallel_core.tensor_parallel.utils import divide, vocab_range


def _tp_group(group: Optional[ProcessGroup]) -> ProcessGroup:
    return mappings._tp_group(group)


def _parallel_parameter(full_shape, partition_dim, stride, group, init_method, dtype,
                        sequence_parallel=False) -> Parameter:
    spec = ShardSpec(tuple(full_shape), partition_dim, stride, group.size, max(group.rank, 0), init_method)
    param = make_parameter(spec, dtype)
    param.tensor_model_parallel = partition_dim is not None and group.size > 1
    param.partition_dim = -1 if partition_dim is None else partition_dim
    param.partition_stride = stride
    param.sequence_parallel = sequence_parallel
    return param


def split_parameter(full_shape, partition_dim: int, init_method: InitMethod, dtype=ms.float32,
                    group: Optional[ProcessGroup] = None) -> Parameter:
    """A parameter split along `partition_dim` over the tensor-parallel group: rank r holds slice r of the
    full tensor (e.g. one value per attention head of this rank)."""
    return _parallel_parameter(full_shape, partition_dim, 1, _tp_group(group), init_method, dtype)


def replicated_parameter(full_shape, init_method: InitMethod, dtype=ms.float32,
                         sequence_parallel: bool = False) -> Parameter:
    """A parameter every tensor-parallel rank holds whole (norm weights, position embeddings).

    `sequence_parallel=True` marks one that sees only this rank's sequence chunk, whose gradient must be
    summed over the tensor-parallel group.
    """
    spec = ShardSpec(tuple(full_shape), None, 1, 1, 0, init_method)
    param = make_parameter(spec, dtype)
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = False, -1, 1
    param.sequence_parallel = sequence_parallel
    return param


def add_bias(y: Tensor, bias: Tensor, kernel: Optional[nn.Cell] = None) -> Tensor:
    """y [..., out] + bias [out]: through `kernel` (cpu_kernels.BiasAdd) for fp32, else the bias tiled over
    the rows first.

    On CPU, MindSpore 2.10's broadcasting `y + bias` is ~10x slower than a same-shape add, and the
    gradient kernel of its BiasAdd op ~10x slower than a column sum (a [2048, 2048] gradient: ~20 ms vs
    ~1 ms); a Tile's gradient is that column sum. The result is the same sum.
    """
    if kernel is not None and y.dtype == ms.float32 and bias.dtype == ms.float32:
        return kernel(y, bias)
    rows = y.reshape(-1, y.shape[-1])
    return (rows + ops.tile(bias.astype(y.dtype).reshape(1, -1), (rows.shape[0], 1))).reshape(y.shape)


class _Matmul(nn.Cell):
    """x [..., in] @ weight[out, in]^T -> [..., out]; 2-D MatMul with a transposed weight is fastest on CPU.

    With a `compute_dtype`, input and weight are cast to it first (parameters stay in their own dtype).
    """

    def __init__(self, compute_dtype=None):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        # fp32: MKL or numpy's OpenBLAS through a CPU kernel where it is built, faster than MindSpore's MatMul
        self.blas = cpu_kernels.Linear() if cpu_kernels.blas_enabled() else None
        self.compute_dtype = compute_dtype

    def construct(self, x, weight):
        if self.compute_dtype is not None:
            x, weight = x.astype(self.compute_dtype), weight.astype(self.compute_dtype)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        # (the kernel takes [..., in] too, but fed without this reshape, compiled TP=2 + SP layers drifted from
        # the single-process losses by 8e-5 after three steps, and eager ones did not: kept 2-D)
        if self.blas is not None and x.dtype == ms.float32 and weight.dtype == ms.float32:
            y = self.blas(x, weight)
        else:
            y = self.matmul(x, weight)
        return y.reshape(lead + (weight.shape[0],))


class ColumnParallelLinear(nn.Cell):
    """Y = X W^T + b with W split along its output rows over the tensor-parallel group.

    Input: [s, b, h] replicated, or [s/tp, b, h] with `sequence_parallel` (gathered here, gradient
    reduce-scattered). Output: [s, b, out/tp], or [s, b, out] with `gather_output`.
    Returns (output, bias) where bias is None unless `skip_bias_add` (the caller then fuses the add).
    `stride` > 1 keeps interleaved pieces together per shard (SwiGLU's [gate; up]).
    `construct(x, weight)` accepts an external weight (the tied output layer passes the embedding's).
    `compute_dtype` (e.g. float16) casts input and weight for the matmul; None computes in the input's dtype.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, gather_output: bool = False,
                 init_method: Optional[InitMethod] = None, stride: int = 1, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, skip_weight_param_allocation: bool = False,
                 params_dtype=ms.float32, compute_dtype=None, tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        self.group = _tp_group(tp_group)
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output cannot be combined with sequence_parallel")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.group.size,
                                                f"ColumnParallelLinear output size (tensor-parallel size "
                                                f"{self.group.size})")
        self.gather_output, self.skip_bias_add, self.sequence_parallel = gather_output, skip_bias_add, \
            sequence_parallel
        init_method = init_method or init_method_normal(0.02)
        self.weight = None if skip_weight_param_allocation else _parallel_parameter(
            (output_size, input_size), 0, stride, self.group, init_method, params_dtype)
        self.bias = _parallel_parameter((output_size,), 0, stride, self.group, constant_init_method(0.0),
                                        params_dtype) if bias else None
        self.matmul = _Matmul(compute_dtype)
        self.bias_add = cpu_kernels.BiasAdd() if bias and cpu_kernels.enabled() else None
        # the region moves, built once (None on one rank): construct then also compiles under mindspore.jit
        self.input_region = mappings.region("gather_from_sequence_parallel" if sequence_parallel
                                            else "copy_to_tensor_model_parallel", self.group)
        self.output_region = mappings.region("gather_from_tensor_model_parallel", self.group) \
            if gather_output else None

    def construct(self, x: Tensor, weight: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear was built with skip_weight_param_allocation=True; "
                                 "pass the weight to construct()")
            weight = self.weight
        elif tuple(weight.shape) != (self.output_size_per_partition, self.input_size):
            raise ValueError(f"ColumnParallelLinear: supplied weight has shape {tuple(weight.shape)}, "
                             f"expected {(self.output_size_per_partition, self.input_size)}")
        if self.input_region is not None:
            x = self.input_region(x)
        y = self.matmul(x, weight)
        if self.bias is not None and not self.skip_bias_add:
            y = add_bias(y, self.bias, self.bias_add)
        if self.output_region is not None:
            y = self.output_region(y)
        return y, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(nn.Cell):
    """Y = X W^T + b with W split along its input columns over the tensor-parallel group.

    Input: [s, b, in/tp] when `input_is_parallel` (the usual case, after a ColumnParallelLinear), else
    [s, b, in] and split here. Output: [s, b, out] summed over ranks, or [s/tp, b, out] reduce-scattered
    with `sequence_parallel`. The bias is replicated and added after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, input_is_parallel: bool = True,
                 init_method: Optional[InitMethod] = None, stride: int = 1, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, params_dtype=ms.float32, compute_dtype=None,
                 tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        self.group = _tp_group(tp_group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.group.size,
                                               f"RowParallelLinear input size (tensor-parallel size "
                                               f"{self.group.size})")
        self.input_is_parallel, self.skip_bias_add, self.sequence_parallel = input_is_parallel, \
            skip_bias_add, sequence_parallel
        init_method = init_method or init_method_normal(0.02)
        self.weight = _parallel_parameter((output_size, input_size), 1, stride, self.group, init_method,
                                          params_dtype)
        self.bias = _parallel_parameter((output_size,), None, 1, self.group, constant_init_method(0.0),
                                        params_dtype, sequence_parallel=sequence_parallel) if bias else None
        self.matmul = _Matmul(compute_dtype)
        self.bias_add = cpu_kernels.BiasAdd() if bias and cpu_kernels.enabled() else None
        self.input_region = None if input_is_parallel else \
            mappings.region("scatter_to_tensor_model_parallel", self.group)
        self.output_region = mappings.region("reduce_scatter_to_sequence_parallel" if sequence_parallel
                                             else "reduce_from_tensor_model_parallel", self.group)

    def construct(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self.input_region is not None:
            x = self.input_region(x)
        y = self.matmul(x, self.weight)
        if self.output_region is not None:
            y = self.output_region(y)  # the partial products summed (and scattered along the sequence)
        if self.bias is not None and not self.skip_bias_add:
            y = add_bias(y, self.bias, self.bias_add)
        return y, (self.bias if self.skip_bias_add else None)


class VocabParallelEmbedding(nn.Cell):
    """Embedding table split by vocabulary rows; each rank looks up the ids it holds and the rest is summed.

    Input: token ids [b, s]. Output: [b, s, h], or with `reduce_scatter_embeddings` the sequence-parallel
    [s/tp, b, h] (transposed and reduce-scattered in one step).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: Optional[InitMethod] = None,
                 reduce_scatter_embeddings: bool = False, params_dtype=ms.float32,
                 tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        self.group = _tp_group(tp_group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start_index, self.vocab_end_index = vocab_range(num_embeddings, max(self.group.rank, 0),
                                                                   self.group.size)
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.weight = _parallel_parameter((num_embeddings, embedding_dim), 0, 1, self.group,
                                          init_method or init_method_normal(0.02), params_dtype)

    def construct(self, input_ids: Tensor) -> Tensor:
        if self.group.size > 1:
            outside = ops.logical_or(input_ids < self.vocab_start_index, input_ids >= self.vocab_end_index)
            local_ids = ops.where(outside, ops.zeros_like(input_ids), input_ids - self.vocab_start_index)
        else:
            local_ids = input_ids
        out = ops.gather(self.weight, local_ids, 0)  # [b, s, h]
        if self.group.size > 1:
            out = out * ops.expand_dims(ops.logical_not(outside), -1).astype(out.dtype)
        if self.reduce_scatter_embeddings:
            out = ops.transpose(out, (1, 0, 2))  # [s, b, h]
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tensor_model_parallel_region(out, self.group)
