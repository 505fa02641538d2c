"""`--verify`: the converted checkpoint computes the source model's logits.

The written checkpoint is read back from disk (every rank's file, merged again), loaded into a
single-process GPTModel, and its logits on a fixed batch are compared with logits that a float64 numpy
forward pass, written here from the maths and independent of GPTModel's code (Mixture-of-Experts layers
included; only the router's host-side top-k and capacity choices are shared with it), computes from the
source's merged weights. The comparison covers the vocabulary columns both sides have (re-padding adds or drops
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


def _route(moe, logits: np.ndarray, expert_bias: Optional[np.ndarray]) -> np.ndarray:
    """Combine weights [T, E] (zero where a token does not go, or was dropped) of Megatron-Core's router in
    evaluation: top-k of the scores (softmax over the chosen logits, or over all with pre-softmax; sigmoid or
    sqrt-softplus scores renormalised over the chosen, an expert bias steering the choice only; sinkhorn
    routing evaluates by its activation), scaled, then capacity dropping. The host-side top-k and capacity
    choices are the router's own numpy functions."""
    from mindtron.parallel_core.moe.router import (capacity_mask, expert_capacity, group_limited_topk_indices,
                                                   topk_indices)

    T, E = logits.shape
    k = moe.moe_router_topk

    def softmax(x):
        z = np.exp(x - x.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def choose(values):
        if moe.moe_router_group_topk:
            return group_limited_topk_indices(values, k, moe.moe_router_num_groups, moe.moe_router_group_topk)
        return topk_indices(values, k)

    if moe.moe_router_load_balancing_type == "sinkhorn":
        scores = 1.0 / (1.0 + np.exp(-logits)) if k == 1 else softmax(logits)
        index = topk_indices(scores, k)
        chosen = np.take_along_axis(scores, index, 1)
    elif moe.moe_router_score_function == "softmax":
        if moe.moe_router_pre_softmax:
            scores = softmax(logits)
            index = choose(scores)
            chosen = np.take_along_axis(scores, index, 1)
        else:
            index = choose(logits)
            chosen = softmax(np.take_along_axis(logits, index, 1))
    else:
        scores = (1.0 / (1.0 + np.exp(-logits)) if moe.moe_router_score_function == "sigmoid"
                  else np.sqrt(np.logaddexp(0.0, logits)))
        index = choose(scores if expert_bias is None else scores + expert_bias[None, :])
        chosen = np.take_along_axis(scores, index, 1)
        if k > 1:
            chosen = chosen / (chosen.sum(-1, keepdims=True) + 1e-20)
    if moe.moe_router_topk_scaling_factor and moe.moe_router_load_balancing_type != "sinkhorn":
        chosen = chosen * moe.moe_router_topk_scaling_factor
    probs = np.zeros((T, E))
    np.put_along_axis(probs, index, chosen, 1)
    if moe.moe_expert_capacity_factor is not None:
        routed = np.zeros((T, E), bool)
        np.put_along_axis(routed, index, True, 1)
        capacity = expert_capacity(T, E, k, moe.moe_expert_capacity_factor)
        probs = probs * capacity_mask(probs, routed, capacity, moe.moe_token_drop_policy)
    return probs


def _moe_mlp(c, x: np.ndarray, w, prefix: str) -> np.ndarray:
    """An MoE layer's MLP on x [b, s, h]: the routed experts' weighted outputs (the weight scales the
    activation, or with --moe-apply-probs-on-input the input) plus the (gated) shared expert. Tokens are
    routed in Megatron's order, position-major (t = position x b + sample), which capacity dropping sees."""
    moe = c.moe_config
    b, s, h = x.shape
    flat = x.transpose(1, 0, 2).reshape(s * b, h)
    probs = _route(moe, _linear(flat, w, prefix + "router."), w.get(prefix + "router.expert_bias"))
    out = np.zeros_like(flat)
    experts = prefix + "experts."
    for e in np.flatnonzero(probs.any(0)):
        rows = np.flatnonzero(probs[:, e])
        p = probs[rows, e][:, None]
        expert = {part: w[experts + part][e] for part in ("dense_h_to_4h.weight", "dense_h_to_4h.bias",
                                                          "dense_4h_to_h.weight", "dense_4h_to_h.bias")
                  if experts + part in w}
        if moe.moe_apply_probs_on_input:
            out[rows] += _linear(_act(c, _linear(flat[rows] * p, expert, "dense_h_to_4h.")), expert, "dense_4h_to_h.")
        else:
            out[rows] += _linear(_act(c, _linear(flat[rows], expert, "dense_h_to_4h.")) * p,
                                 {"weight": expert["dense_4h_to_h.weight"]}, "")
            if "dense_4h_to_h.bias" in expert:
                out[rows] += p * expert["dense_4h_to_h.bias"]
    shared = prefix + "shared_experts."
    if shared + "dense_h_to_4h.weight" in w:
        y = _linear(_act(c, _linear(flat, w, shared + "dense_h_to_4h.")), w, shared + "dense_4h_to_h.")
        if shared + "gate_weight" in w:
            y = y / (1.0 + np.exp(-(flat @ w[shared + "gate_weight"].T)))
        out = out + y
    return out.reshape(s, b, h).transpose(1, 0, 2)


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
        normed = _norm(c, x, w, p + "post_attention_norm.")
        if c.moe_config.is_moe_layer(i, c.num_layers):
            mlp = _moe_mlp(c, normed, w, p + "mlp.")
        else:
            mlp = _linear(_act(c, _linear(normed, w, p + "mlp.dense_h_to_4h.")), w, p + "mlp.dense_4h_to_h.")
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
    # routing as in evaluation, in one process: no random logits, no recomputation, one dispatcher
    moe = dataclasses.replace(config.moe_config, moe_router_force_load_balancing=False, moe_layer_recompute=False,
                              moe_token_dispatcher_type="allgather", moe_input_jitter_eps=None)
    return dataclasses.replace(config, seq_length=seq, moe_config=moe, attention_dropout_rate=0.0,
                               hidden_dropout_rate=0.0,
                               **optional, sequence_parallel=False, recompute_granularity=None,
                               recompute_method=None, num_layer_list=None, params_dtype="float32",
                               compute_dtype="float32", embedding_init_dtype="float32", use_flash_attention=False)
