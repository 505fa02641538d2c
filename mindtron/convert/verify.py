"""`--verify`: the converted checkpoint computes the source model's logits.

The written checkpoint is read back from disk (every rank's file, merged again), loaded into a
single-process GPTModel, and its logits on a fixed batch are compared with logits that a float64 numpy
forward pass, written here from the maths and independent of GPTModel's code, computes from the source's
merged weights. The comparison covers the vocabulary columns both sides have (re-padding adds or drops
only padding rows).
"""
from __future__ import annotations

from math import erf
from typing import Dict, Optional

import numpy as np

from mindtron.convert import names as N


# --------------------------------------------------------------------------------------------------------
# float64 reference forward pass
# --------------------------------------------------------------------------------------------------------
def _norm(c, x, w: Dict[str, np.ndarray], prefix: str) -> np.ndarray:
    if c.normalization == "RMSNorm":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_epsilon) * w[prefix + "weight"]
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + c.norm_epsilon) * w[prefix + "weight"] \
        + w[prefix + "bias"]


def _linear(x, w, prefix: str) -> np.ndarray:
    y = x @ w[prefix + "weight"].T
    bias = w.get(prefix + "bias")
    return y if bias is None else y + bias


def _act(c, h: np.ndarray) -> np.ndarray:
    if c.hidden_act == "swiglu":
        gate, up = np.split(h, 2, axis=-1)
        return gate / (1.0 + np.exp(-gate)) * up
    tanh_gelu = c.hidden_act == "gelu_tanh" or (c.hidden_act == "gelu" and c.bias_gelu_fusion and c.add_bias_linear)
    if tanh_gelu:
        return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
    if c.hidden_act == "gelu":
        return 0.5 * h * (1.0 + np.vectorize(erf)(h / np.sqrt(2.0)))
    if c.hidden_act == "squared_relu":
        return np.maximum(h, 0.0) ** 2
    return h / (1.0 + np.exp(-h))  # silu


def _rotary(c, x: np.ndarray) -> np.ndarray:
    """x [b, s, heads, hn]: channel pairs (i, i + d/2) of the first d channels turned by position * base^(-2i/d)."""
    d = c.rotary_dim
    inv = c.rotary_base ** (-np.arange(0, d, 2) / d)
    angle = np.arange(x.shape[1])[:, None] * inv[None, :]
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    first, second = x[..., : d // 2], x[..., d // 2: d]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin, x[..., d:]], axis=-1)


def _attention(c, x: np.ndarray, w, prefix: str) -> np.ndarray:
    b, s, _ = x.shape
    heads, groups, hn = c.num_attention_heads, c.num_query_groups, c.kv_channels
    per_group = heads // groups
    qkv = _linear(x, w, prefix + "query_key_value.").reshape(b, s, groups, per_group + 2, hn)
    q = qkv[:, :, :, :per_group].reshape(b, s, heads, hn)
    k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
    if c.position_embedding_type == "rope":
        q, k = _rotary(c, q), _rotary(c, k)
    k, v = np.repeat(k, per_group, axis=2), np.repeat(v, per_group, axis=2)
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(hn)
    scores = np.where(np.triu(np.ones((s, s), bool), 1), -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, heads * hn)
    return _linear(context, w, prefix + "dense.")


def reference_logits(config, tensors: Dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Logits [b, s, vocab rows] of the whole model `tensors` (canonical names), causal, in float64."""
    c = config
    w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    x = w[N.WORD][tokens]
    if c.position_embedding_type == "learned_absolute":
        x = x + w[N.POSITION][np.arange(tokens.shape[1])][None]
    for i in range(c.num_layers):
        p = f"{N.LAYER_PREFIX}{i}."
        attn = _attention(c, _norm(c, x, w, p + "input_norm."), w, p + "self_attention.")
        if c.use_sandwich_norm:
            attn = _norm(c, attn, w, p + "attn_post_norm.")
        x = x + attn
        mlp = _linear(_act(c, _linear(_norm(c, x, w, p + "post_attention_norm."), w, p + "mlp.dense_h_to_4h.")),
                      w, p + "mlp.dense_4h_to_h.")
        if c.use_sandwich_norm:
            mlp = _norm(c, mlp, w, p + "ffn_post_norm.")
        x = x + mlp
    x = _norm(c, x, w, N.FINAL_NORM)
    head = w[N.OUTPUT] if c.untie_embeddings_and_output_weights else w[N.WORD]
    return x @ head.T


# --------------------------------------------------------------------------------------------------------
# GPTModel on the converted weights
# --------------------------------------------------------------------------------------------------------
def model_logits(config, tensors: Dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Logits [b, s, vocab rows] of a single-process GPTModel holding `tensors` (names must match exactly)."""
    import mindspore as ms
    from mindspore import Tensor

    from mindtron.legacy_model import GPTModel
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core import tensor_parallel as tp

    if ms.get_context("mode") != ms.PYNATIVE_MODE:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    owned = not ps.model_parallel_is_initialized()
    if owned:
        ps.initialize_model_parallel()
    try:
        if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("--verify runs the model in one process (tensor and pipeline parallel size 1)")
        tp.model_parallel_seed(1234)
        model = GPTModel(config)
        model.set_train(False)
        params = dict(model.parameters_and_names())
        if set(params) != set(tensors):
            raise ValueError(f"the converted weights do not match GPTModel's parameters: missing "
                             f"{sorted(set(params) - set(tensors))[:4]}, extra {sorted(set(tensors) - set(params))[:4]}")
        for name, param in params.items():
            param.set_data(Tensor(np.asarray(tensors[name]), param.dtype))
        return model(Tensor(tokens, ms.int32)).asnumpy()
    finally:
        if owned:
            ps.destroy_model_parallel()


def verify_logits(source_config, source_tensors: Dict[str, np.ndarray], target_config,
                  target_tensors: Dict[str, np.ndarray], true_vocab: Optional[int] = None, batch: int = 2,
                  seq: int = 16, seed: int = 1234, tolerance: float = 1e-4) -> Dict[str, float]:
    """Compare GPTModel(target) with the reference forward of the source weights; ValueError beyond tolerance."""
    seq = min(seq, source_config.seq_length)
    common = min(source_config.vocab_size, target_config.vocab_size)
    high = min(common, true_vocab) if true_vocab else common
    tokens = np.random.default_rng(seed).integers(0, high, (batch, seq))
    want = reference_logits(source_config, source_tensors, tokens)[..., :common]
    check_config = _for_checking(target_config, seq)
    got = model_logits(check_config, target_tensors, tokens)[..., :common]
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max()) or 1.0
    result = {"max_abs_diff": diff, "relative": diff / scale, "tokens": float(batch * seq)}
    if not diff / scale <= tolerance:
        raise ValueError(f"--verify failed: the converted model's logits differ from the source weights' by "
                         f"{diff:.3g} (relative {diff / scale:.3g} > {tolerance:g}); the conversion is wrong for "
                         "this model — check the model settings (flags) against how the checkpoint was trained")
    return result


def _for_checking(config, seq: int):
    import dataclasses

    optional = {f.name: False for f in dataclasses.fields(config) if f.name == "jit_layers"}
    return dataclasses.replace(config, seq_length=seq, attention_dropout_rate=0.0, hidden_dropout_rate=0.0,
                               **optional, sequence_parallel=False, recompute_granularity=None,
                               recompute_method=None, num_layer_list=None, params_dtype="float32",
                               compute_dtype="float32", embedding_init_dtype="float32", use_flash_attention=False)
