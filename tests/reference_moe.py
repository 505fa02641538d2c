"""An independent float64 numpy Mixture-of-Experts layer, written from Megatron-Core's semantics
(../shared/megatron/moe.md and Megatron's router maths), to check mindtron's router, losses and layer.

Tokens are rows t = position * batch + sample of hidden [s, b, h]. Weights are full tensors by mindtron's
names under `prefix` (router.weight [E, h], experts.dense_h_to_4h.weight [E, ffn(x2), h], ...).
"""
import math

import numpy as np


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _topk(values, k):
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def route(moe, logits, expert_bias=None):
    """(probs [T, E], routed [T, E] before dropping, kept [T, E]) for logits [T, E]."""
    T, E = logits.shape
    k = moe.moe_router_topk
    fn = moe.moe_router_score_function
    if fn == "softmax":
        if moe.moe_router_pre_softmax:
            scores = _softmax(logits)
            idx = _choose(moe, scores)
            chosen = np.take_along_axis(scores, idx, 1)
        else:
            idx = _choose(moe, logits)
            chosen = _softmax(np.take_along_axis(logits, idx, 1))
    else:
        scores = 1 / (1 + np.exp(-logits)) if fn == "sigmoid" else np.sqrt(np.log1p(np.exp(logits)))
        idx = _choose(moe, scores + (0 if expert_bias is None else expert_bias[None]))
        chosen = np.take_along_axis(scores, idx, 1)
        if k > 1:
            chosen = chosen / (chosen.sum(-1, keepdims=True) + 1e-20)
    if moe.moe_router_topk_scaling_factor:
        chosen = chosen * moe.moe_router_topk_scaling_factor
    probs = np.zeros((T, E))
    np.put_along_axis(probs, idx, chosen, 1)
    routed = probs != 0
    routed[np.arange(T)[:, None], idx] = True
    kept = routed.copy()
    if moe.moe_expert_capacity_factor is not None:
        capacity = math.ceil(T * k / E * moe.moe_expert_capacity_factor)
        if capacity <= T:
            keep = np.zeros((T, E), bool)
            for e in range(E):
                if moe.moe_token_drop_policy == "probs":
                    order = np.argsort(-probs[:, e], kind="stable")
                else:  # position: the earliest routed tokens
                    order = np.concatenate([np.flatnonzero(routed[:, e]), np.flatnonzero(~routed[:, e])])
                keep[order[:capacity], e] = True
            kept = routed & keep
            probs = probs * kept
    return probs, routed, kept


def _choose(moe, values):
    k = moe.moe_router_topk
    if not moe.moe_router_group_topk:
        return _topk(values, k)
    T, E = values.shape
    G = moe.moe_router_num_groups
    per_group = np.sort(values.reshape(T, G, E // G), -1)[..., ::-1][..., :k // moe.moe_router_group_topk].sum(-1)
    groups = _topk(per_group, moe.moe_router_group_topk)
    allowed = np.zeros((T, G), bool)
    np.put_along_axis(allowed, groups, True, 1)
    return _topk(np.where(np.repeat(allowed, E // G, 1), values, -np.inf), k)


def aux_loss(moe, logits, coeff):
    """Megatron's switch load-balancing loss on one rank's tokens: E coeff / (k T^2) sum_e P_e n_e."""
    T, E = logits.shape
    scores = _softmax(logits)
    counts = np.zeros(E)
    np.add.at(counts, _topk(scores, moe.moe_router_topk).ravel(), 1)
    return E * coeff / (moe.moe_router_topk * T * T) * (scores.sum(0) * counts).sum()


def seq_aux_loss(moe, logits, s, b, coeff):
    """The per-sequence version, averaged over the b sequences."""
    E = logits.shape[1]
    per_seq = logits.reshape(s, b, E)
    return np.mean([aux_loss(moe, per_seq[:, j], coeff) for j in range(b)])


def z_loss(logits, coeff):
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return coeff * np.mean(lse ** 2)


def moe_mlp(moe, x, params, prefix, activation, shared_activation=None):
    """Output [s, b, h] of an MoE MLP on x [s, b, h] (no expert parallelism: every expert here)."""
    s, b, h = x.shape
    flat = x.reshape(s * b, h)
    logits = flat @ params[prefix + "router.weight"].T
    if prefix + "router.bias" in params:
        logits = logits + params[prefix + "router.bias"]
    probs, _, kept = route(moe, logits, params.get(prefix + "router.expert_bias"))
    w1, w2 = params[prefix + "experts.dense_h_to_4h.weight"], params[prefix + "experts.dense_4h_to_h.weight"]
    b1, b2 = params.get(prefix + "experts.dense_h_to_4h.bias"), params.get(prefix + "experts.dense_4h_to_h.bias")
    out = np.zeros_like(flat)
    for e in range(w1.shape[0]):
        rows = np.flatnonzero(kept[:, e])
        if rows.size == 0:
            continue
        p = probs[rows, e][:, None]
        hidden = flat[rows] @ w1[e].T + (0 if b1 is None else b1[e])
        y = (activation(hidden) * p) @ w2[e].T + (0 if b2 is None else b2[e] * p)
        np.add.at(out, rows, y)
    if prefix + "shared_experts.dense_h_to_4h.weight" in params:
        hidden = flat @ params[prefix + "shared_experts.dense_h_to_4h.weight"].T
        shared = activation(hidden) @ params[prefix + "shared_experts.dense_4h_to_h.weight"].T
        if prefix + "shared_experts.gate_weight" in params:
            gate = flat @ params[prefix + "shared_experts.gate_weight"].T
            shared = shared / (1 + np.exp(-gate))
        out = out + shared
    return out.reshape(s, b, h)
