"""Layout-independent parameter initialisation.

Every parameter's full tensor is drawn from a numpy generator seeded by (global seed, parameter name), and
each rank keeps its slice, so a model built with TP=1 and with TP=N starts from the same weights (Megatron's
`--use-cpu-initialization` semantics). Layers create parameters with a `ShardSpec` saying how the full
tensor is split and how it is initialised; `initialize_parameters(cell, seed)` fills them all, by name.

An init method is `f(rng: np.random.Generator, shape) -> np.ndarray`.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

InitMethod = Callable[[np.random.Generator, Tuple[int, ...]], np.ndarray]


def init_method_normal(sigma: float) -> InitMethod:
    """N(0, sigma^2), Megatron's default (`--init-method-std`)."""
    def init(rng, shape):
        return rng.normal(0.0, sigma, size=shape)
    return init


def scaled_init_method_normal(sigma: float, num_layers: int) -> InitMethod:
    """N(0, (sigma / sqrt(2 num_layers))^2), for the projections that feed the residual stream."""
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))


def xavier_uniform_init_method() -> InitMethod:
    """Glorot uniform over the full tensor's fan-in and fan-out (`--init-method-xavier-uniform`)."""
    def init(rng, shape):
        fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=shape)
    return init


def constant_init_method(value: float) -> InitMethod:
    """Every element equal to `value` (biases: 0, norm scales: 1)."""
    def init(rng, shape):
        return np.full(shape, value)
    return init


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter's full tensor is split over the tensor-parallel ranks and how it is initialised.

    partition_dim: the split dimension, or None for a replicated parameter.
    partition_stride: the full tensor is cut into `stride x world` pieces along the split dimension and
        rank r keeps pieces r, r + world, ... (stride 2 keeps a [gate; up] pair together in each shard).
    world_size / rank: the tensor-parallel group size and this rank's index in it.
    init_method: draws the full tensor.
    expert_world_size / expert_rank: for stacked expert weights [experts, ...], the expert-parallel split
        of dimension 0 (rank r holds a contiguous block of experts), applied before the tensor split.
    """

    full_shape: Tuple[int, ...]
    partition_dim: Optional[int]
    partition_stride: int
    world_size: int
    rank: int
    init_method: InitMethod
    expert_world_size: int = 1
    expert_rank: int = 0

    def local_shape(self) -> Tuple[int, ...]:
        """The shape of this rank's slice."""
        shape = list(self.full_shape)
        shape[0] //= self.expert_world_size
        if self.partition_dim is not None:
            shape[self.partition_dim] //= self.world_size
        return tuple(shape)

    def shard(self, full: np.ndarray) -> np.ndarray:
        """This rank's slice of a full tensor."""
        if self.expert_world_size > 1:
            full = np.split(full, self.expert_world_size, axis=0)[self.expert_rank]
        if self.partition_dim is None or self.world_size == 1:
            return full
        pieces = np.split(full, self.world_size * self.partition_stride, axis=self.partition_dim)
        return np.concatenate(pieces[self.rank::self.world_size], axis=self.partition_dim)

    def unshard(self, shards: Sequence[np.ndarray]) -> np.ndarray:
        """The full tensor from every rank's slice (in rank order); inverse of `shard`."""
        if self.partition_dim is None or self.world_size == 1:
            return shards[0]
        per_rank = [np.split(s, self.partition_stride, axis=self.partition_dim) for s in shards]
        ordered = [per_rank[r][k] for k in range(self.partition_stride) for r in range(self.world_size)]
        return np.concatenate(ordered, axis=self.partition_dim)


def make_parameter(spec: ShardSpec, dtype=ms.float32, requires_grad: bool = True) -> Parameter:
    """A parameter of this rank's shard shape carrying `spec` (filled by initialize_parameters)."""
    shape = list(spec.full_shape)
    if spec.partition_dim is not None:
        if shape[spec.partition_dim] % (spec.world_size * spec.partition_stride):
            raise ValueError(f"dimension {spec.partition_dim} of a parameter of shape {spec.full_shape} is "
                             f"not divisible by {spec.world_size * spec.partition_stride} (tensor-parallel "
                             f"size {spec.world_size} x stride {spec.partition_stride})")
    if shape[0] % spec.expert_world_size:
        raise ValueError(f"{shape[0]} experts cannot be split over {spec.expert_world_size} expert-parallel ranks")
    param = Parameter(Tensor(np.zeros(spec.local_shape(), np.float32), dtype), requires_grad=requires_grad)
    param.shard_spec = spec
    return param


def parameter_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for one named parameter: independent of layout, rank and creation order."""
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def full_initial_value(spec: ShardSpec, seed: int, name: str) -> np.ndarray:
    """The full (unsharded) fp32 tensor a parameter named `name` starts from."""
    return np.asarray(spec.init_method(parameter_rng(seed, name), spec.full_shape), dtype=np.float32)


def initialize_parameters(cell: nn.Cell, seed: Optional[int] = None, prefix: str = "",
                          rename: Optional[Callable[[str], str]] = None) -> None:
    """Fill every parameter of `cell` that carries a ShardSpec from (seed, its name), sharded for this rank.

    Names are the cell's own parameter paths (`prefix` prepended), so initialise from the model's root for
    the names to be the checkpoint names. `rename` maps a local name to the layout-independent one (a
    pipeline stage's `layers.0` is global layer 4, say). `seed` defaults to the one given to
    model_parallel_seed().
    """
    if seed is None:
        from mindtron.parallel_core.tensor_parallel.random import initial_seed

        seed = initial_seed()
    for name, param in cell.parameters_and_names():
        spec = getattr(param, "shard_spec", None)
        if spec is None:
            continue
        name = prefix + name
        full = full_initial_value(spec, seed, rename(name) if rename else name)
        param.set_data(Tensor(spec.shard(full), param.dtype))
