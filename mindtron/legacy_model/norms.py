"""LayerNorm, RMSNorm and L2Norm over the last dimension, with Megatron's parameter names (`weight`, `bias`).

All normalise in fp32 and return the input's dtype. Under sequence parallelism their parameters see
only this rank's tokens, so they are marked `sequence_parallel` (gradients summed over tp); so are the
query/key norms, which see only this rank's heads. With zero-centred gamma (--apply-layernorm-1p) the
stored weight is gamma - 1: it starts at init_value - 1 and the norm multiplies by 1 + weight.
"""
from __future__ import annotations

from typing import Optional

from mindspore import nn, ops
import mindspore as ms

from mindtron.legacy_model.fused import use_fused
from mindtron.parallel_core import cpu_kernels
from mindtron.parallel_core.tensor_parallel import constant_init_method, replicated_parameter
from mindtron.parallel_core.tensor_parallel.utils import expand_last


class _LayerNormRows(nn.Cell):
    """MindSpore's LayerNorm kernel on x [N, h] (fp32), with its gradient written out on same-shape tensors.

    MindSpore 2.10's CPU LayerNormGrad takes ~20 ms on [2048, 512], where the same maths as ~15 same-shape
    ops takes ~8 ms: with xhat = (x - mean) * rstd and g = dy * weight,
    dx = rstd * (g - mean_h(g) - xhat * mean_h(g * xhat)), dweight = sum_N(dy * xhat), dbias = sum_N(dy).
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x, weight, bias):
        return self.layer_norm(x, weight, bias)  # (y, mean [N, 1], variance [N, 1])

    def bprop(self, x, weight, bias, out, dout):
        n, h = x.shape
        dy = dout[0]
        rstd = expand_last(ops.rsqrt(out[2] + self.eps), h)
        xhat = (x - expand_last(out[1], h)) * rstd
        g = dy * ops.matmul(ops.ones((n, 1), dy.dtype), weight.reshape(1, h))
        g_mean = expand_last(g.mean(-1, keep_dims=True), h)
        gx_mean = expand_last((g * xhat).mean(-1, keep_dims=True), h)
        dx = (g - g_mean - xhat * gx_mean) * rstd
        return dx, (dy * xhat).sum(0), dy.sum(0)


class LayerNorm(nn.Cell):
    """y = (x - mean) / sqrt(var + eps) * weight + bias (weight + 1 with zero_centered_gamma)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 params_dtype=ms.float32, init_value: float = 1.0, zero_centered_gamma: bool = False):
        super().__init__()
        self.gamma_offset = 1.0 if zero_centered_gamma else 0.0
        self.weight = replicated_parameter((hidden_size,), constant_init_method(init_value - self.gamma_offset),
                                           params_dtype, sequence_parallel)
        self.bias = replicated_parameter((hidden_size,), constant_init_method(0.0), params_dtype,
                                         sequence_parallel)
        # (y, mean, 1/std or variance): the fused CPU kernel where it is built, else MindSpore's kernel
        self.layer_norm = cpu_kernels.LayerNormRows(eps) if cpu_kernels.enabled() else _LayerNormRows(eps)

    def construct(self, x):
        weight = self.weight.astype(ms.float32)
        if self.gamma_offset:
            weight = weight + self.gamma_offset
        y = self.layer_norm(x.astype(ms.float32).reshape(-1, x.shape[-1]), weight, self.bias.astype(ms.float32))[0]
        return y.reshape(x.shape).astype(x.dtype)


class RMSNorm(nn.Cell):
    """y = x / sqrt(mean(x^2) + eps) * weight (weight + 1 with zero_centered_gamma)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 params_dtype=ms.float32, init_value: float = 1.0, use_fused_rmsnorm: bool = False,
                 zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps
        self.gamma_offset = 1.0 if zero_centered_gamma else 0.0
        self.weight = replicated_parameter((hidden_size,), constant_init_method(init_value - self.gamma_offset),
                                           params_dtype, sequence_parallel)
        self.fused = use_fused("rmsnorm", use_fused_rmsnorm)

    def construct(self, x):
        x32 = x.astype(ms.float32)
        weight = self.weight.astype(ms.float32)
        if self.gamma_offset:
            weight = weight + self.gamma_offset
        if self.fused:
            return ops.rms_norm(x32, weight, self.eps)[0].astype(x.dtype)
        y = x32 * ops.rsqrt(ops.mean(x32 * x32, -1, keep_dims=True) + self.eps)
        return (y * weight).astype(x.dtype)


class L2Norm(nn.Cell):
    """y = x / sqrt(mean(x^2) + eps), no parameters (Megatron's L2Norm, --qk-l2-norm)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def construct(self, x):
        x32 = x.astype(ms.float32)
        return (x32 * ops.rsqrt(ops.mean(x32 * x32, -1, keep_dims=True) + self.eps)).astype(x.dtype)


def build_norm(config, sequence_parallel: bool = False, init_value: float = 1.0,
               hidden_size: Optional[int] = None) -> nn.Cell:
    """The norm `config.normalization` names, sized for the hidden state (or `hidden_size`)."""
    kwargs = dict(eps=config.norm_epsilon, sequence_parallel=sequence_parallel,
                  params_dtype=config.dtype("params_dtype"), init_value=init_value,
                  zero_centered_gamma=config.layernorm_zero_centered_gamma)
    size = config.hidden_size if hidden_size is None else hidden_size
    if config.normalization == "RMSNorm":
        return RMSNorm(size, use_fused_rmsnorm=config.use_fused_rmsnorm, **kwargs)
    return LayerNorm(size, **kwargs)
