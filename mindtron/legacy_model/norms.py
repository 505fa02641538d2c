"""LayerNorm and RMSNorm over the last dimension, with Megatron's parameter names (`weight`, `bias`).

Both normalise in fp32 and return the input's dtype. Under sequence parallelism their parameters see
only this rank's tokens, so they are marked `sequence_parallel` (gradients summed over tp).
"""
from __future__ import annotations

from mindspore import nn, ops
import mindspore as ms

from mindtron.legacy_model.fused import use_fused
from mindtron.parallel_core.tensor_parallel import constant_init_method, replicated_parameter


class LayerNorm(nn.Cell):
    """y = (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 params_dtype=ms.float32, init_value: float = 1.0):
        super().__init__()
        self.weight = replicated_parameter((hidden_size,), constant_init_method(init_value), params_dtype,
                                           sequence_parallel)
        self.bias = replicated_parameter((hidden_size,), constant_init_method(0.0), params_dtype,
                                         sequence_parallel)
        # MindSpore's LayerNorm kernel (what nn.LayerNorm runs), with our own parameter names.
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.layer_norm(x.astype(ms.float32), self.weight.astype(ms.float32),
                                  self.bias.astype(ms.float32))
        return y.astype(x.dtype)


class RMSNorm(nn.Cell):
    """y = x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 params_dtype=ms.float32, init_value: float = 1.0, use_fused_rmsnorm: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = replicated_parameter((hidden_size,), constant_init_method(init_value), params_dtype,
                                           sequence_parallel)
        self.fused = use_fused("rmsnorm", use_fused_rmsnorm)

    def construct(self, x):
        x32 = x.astype(ms.float32)
        if self.fused:
            return ops.rms_norm(x32, self.weight.astype(ms.float32), self.eps)[0].astype(x.dtype)
        y = x32 * ops.rsqrt(ops.mean(x32 * x32, -1, keep_dims=True) + self.eps)
        return (y * self.weight.astype(ms.float32)).astype(x.dtype)


def build_norm(config, sequence_parallel: bool = False, init_value: float = 1.0) -> nn.Cell:
    """The norm `config.normalization` names, sized for the hidden state."""
    kwargs = dict(eps=config.norm_epsilon, sequence_parallel=sequence_parallel,
                  params_dtype=config.dtype("params_dtype"), init_value=init_value)
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, use_fused_rmsnorm=config.use_fused_rmsnorm, **kwargs)
    return LayerNorm(config.hidden_size, **kwargs)
