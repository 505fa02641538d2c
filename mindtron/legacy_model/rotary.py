"""Rotary position embedding (RoPE) in Megatron's rotate-half form.

Frequencies for channel pair i are base^(-2i/d) with d = kv_channels x rotary_percent; positions are
0..s-1 (Megatron's legacy model rotates by position in the sequence, not by reset position ids). Only the
first d channels of each head rotate; the rest pass through.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.legacy_model.fused import use_fused


class RotaryEmbedding(nn.Cell):
    """Angles [s, 1, 1, d] for a sequence length (cached per length)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base
        self._cache: dict = {}

    def construct(self, seq_length: int) -> Tensor:
        freqs = self._cache.get(seq_length)
        if freqs is None:
            inv_freq = 1.0 / (self.base ** (np.arange(0, self.dim, 2, dtype=np.float32) / self.dim))
            angles = np.outer(np.arange(seq_length, dtype=np.float32), inv_freq)  # [s, d/2]
            freqs = np.concatenate([angles, angles], -1)[:, None, None, :]  # [s, 1, 1, d]
            freqs = self._cache[seq_length] = Tensor(freqs, ms.float32)
        return freqs


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = ops.chunk(x, 2, -1)
    return ops.concat([-x2, x1], -1)


def apply_rotary_pos_emb(t: Tensor, freqs: Tensor, fused: bool = False) -> Tensor:
    """Rotate the first freqs.shape[-1] channels of t [s, b, n, hn] by the angles freqs [s, 1, 1, d];
    `fused` asks for MindSpore's rotary kernel where the backend has it."""
    return rotate(t, freqs, use_fused("rope", fused))


def rotate(t: Tensor, freqs: Tensor, kernel: bool = False) -> Tensor:
    """apply_rotary_pos_emb with the kernel choice already made (`kernel` True only where it exists), so
    that it also compiles inside mindspore.jit."""
    dim = freqs.shape[-1]
    if freqs.shape[0] != t.shape[0]:
        freqs = freqs[:t.shape[0]]  # angles are built for --seq-length; shorter inputs use the first rows
    cos, sin = ops.cos(freqs).astype(t.dtype), ops.sin(freqs).astype(t.dtype)
    if dim == t.shape[-1]:
        t_rot, t_pass = t, None
    else:
        t_rot, t_pass = t[..., :dim], t[..., dim:]
    if kernel:
        rotated = ops.rotary_position_embedding(t_rot, cos, sin, 0)  # SBND layout, S11D angles
    else:
        rotated = t_rot * cos + _rotate_half(t_rot) * sin
    return rotated if t_pass is None else ops.concat([rotated, t_pass], -1)
