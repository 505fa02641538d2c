"""Rotary position embedding (RoPE) as Megatron-Core computes it.

Frequencies for channel pair i are base^(-2i/d) with d = kv_channels x rotary_percent; positions are
0..s-1 (Megatron's legacy model rotates by position in the sequence, not by reset position ids). Only the
first d channels of each head rotate; the rest pass through. Options (TransformerConfig):

- rotate-half pairs (i, i + d/2) by default, interleaved pairs (2i, 2i + 1) with `rotary_interleaved`;
- `rotary_seq_len_interpolation_factor` f divides the positions by f (linear interpolation);
- `use_rope_scaling` applies Llama 3.x's frequency scaling (`rope_scaling_factor`);
- position_embedding_type "yarn": YaRN's blend of interpolated and original frequencies over all
  kv_channels, and its attention temperature `mscale` multiplying cos and sin (so the scores of rotated
  channels scale by mscale^2).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.legacy_model.fused import use_fused


def llama3_scaled_inv_freq(inv_freq: np.ndarray, factor: float, low_freq_factor: float = 1.0,
                           high_freq_factor: float = 4.0, original_context: int = 8192) -> np.ndarray:
    """Llama 3.x RoPE scaling (Megatron-Core's constants): long wavelengths divided by `factor`, short ones
    kept, the band between blended linearly in context / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_positions: int) -> float:
    return dim * math.log(max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_positions: int, beta_fast: float,
                  beta_slow: float, round_to_int: bool) -> np.ndarray:
    """YaRN's frequencies: the original ones above the correction range (high frequency), the ones divided
    by `factor` below it, a linear ramp over channel pairs in between."""
    extra = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inter = 1.0 / (factor * base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low = _yarn_correction_dim(beta_fast, dim, base, original_max_positions)
    high = _yarn_correction_dim(beta_slow, dim, base, original_max_positions)
    if round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # YaRN's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1.0 - ramp).astype(np.float32)  # 1: original frequency, 0: interpolated
    return inter * (1 - keep) + extra * keep


def yarn_mscale(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """YaRN's attention temperature (Megatron's concentration factor) multiplying cos and sin."""
    def get(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    return float(get(factor, mscale) / get(factor, mscale_all_dim))


class RotaryEmbedding(nn.Cell):
    """Angles [s, 1, 1, d] for a sequence length (cached per length), and the cos/sin multiplier."""

    def __init__(self, config):
        super().__init__()
        dim = config.rotary_dim
        self.dim = dim
        self.interleaved = config.rotary_interleaved
        self.interpolation = config.rotary_seq_len_interpolation_factor
        self.mscale = 1.0
        if config.position_embedding_type == "yarn":
            self.interpolation = None  # Megatron's YaRN does not interpolate positions
            self.inv_freq = yarn_inv_freq(dim, float(config.rotary_base), config.yarn_rotary_scaling_factor,
                                          config.yarn_original_max_position_embeddings, config.yarn_beta_fast,
                                          config.yarn_beta_slow, config.yarn_correction_range_round_to_int)
            self.mscale = yarn_mscale(config.yarn_rotary_scaling_factor, config.yarn_mscale,
                                      config.yarn_mscale_all_dim)
        else:
            self.inv_freq = 1.0 / (float(config.rotary_base) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
            if config.use_rope_scaling:
                self.inv_freq = llama3_scaled_inv_freq(self.inv_freq, config.rope_scaling_factor)
        self.inv_freq = self.inv_freq.astype(np.float32)
        self._cache: dict = {}

    def construct(self, seq_length: int) -> Tensor:
        freqs = self._cache.get(seq_length)
        if freqs is None:
            positions = np.arange(seq_length, dtype=np.float32)
            if self.interpolation is not None:
                positions = positions / np.float32(self.interpolation)
            angles = np.outer(positions, self.inv_freq).astype(np.float32)  # [s, d/2]
            if self.interleaved:
                freqs = np.repeat(angles, 2, axis=-1)  # [f0, f0, f1, f1, ...]
            else:
                freqs = np.concatenate([angles, angles], -1)  # [f0, f1, ..., f0, f1, ...]
            freqs = self._cache[seq_length] = Tensor(freqs[:, None, None, :], ms.float32)
        return freqs


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = ops.chunk(x, 2, -1)
    return ops.concat([-x2, x1], -1)


def _rotate_pairs(x: Tensor) -> Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] (the interleaved form's rotation)."""
    shape = x.shape
    pairs = x.reshape(shape[:-1] + (shape[-1] // 2, 2))
    even, odd = ops.split(pairs, 1, -1)
    return ops.concat([-odd, even], -1).reshape(shape)


def apply_rotary_pos_emb(t: Tensor, freqs: Tensor, fused: bool = False, interleaved: bool = False,
                         mscale: float = 1.0) -> Tensor:
    """Rotate the first freqs.shape[-1] channels of t [s, b, n, hn] by the angles freqs [s, 1, 1, d];
    `fused` asks for MindSpore's rotary kernel where the backend has it."""
    return rotate(t, freqs, use_fused("rope", fused), interleaved, mscale)


def rotate(t: Tensor, freqs: Tensor, kernel: bool = False, interleaved: bool = False, mscale: float = 1.0) -> Tensor:
    """apply_rotary_pos_emb with the kernel choice already made (`kernel` True only where it exists), so
    that it also compiles inside mindspore.jit."""
    dim = freqs.shape[-1]
    if freqs.shape[0] != t.shape[0]:
        freqs = freqs[:t.shape[0]]  # angles are built for --seq-length; shorter inputs use the first rows
    cos, sin = ops.cos(freqs), ops.sin(freqs)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    cos, sin = cos.astype(t.dtype), sin.astype(t.dtype)
    if dim == t.shape[-1]:
        t_rot, t_pass = t, None
    else:
        t_rot, t_pass = t[..., :dim], t[..., dim:]
    if kernel:
        # SBND layout, S11D angles; mode 1 rotates interleaved pairs, mode 0 halves
        rotated = ops.rotary_position_embedding(t_rot, cos, sin, 1 if interleaved else 0)
    else:
        rotated = t_rot * cos + (_rotate_pairs(t_rot) if interleaved else _rotate_half(t_rot)) * sin
    return rotated if t_pass is None else ops.concat([rotated, t_pass], -1)


def rotary_settings(config) -> Tuple[bool, float]:
    """(interleaved, mscale) the attention layers pass to `rotate` for this config."""
    mscale = 1.0
    if config.position_embedding_type == "yarn":
        mscale = yarn_mscale(config.yarn_rotary_scaling_factor, config.yarn_mscale, config.yarn_mscale_all_dim)
    return config.rotary_interleaved, mscale
