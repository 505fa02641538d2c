"""An independent float64 numpy GPT, written from the maths (not from mindtron's modules), to check
GPTModel's logits. Inputs are batch-first [b, s]; weights are the full (unsharded) tensors by their
Megatron names."""
import numpy as np

PREFIX = "language_model.encoder.layers.{}."


def _norm(cfg, x, params, name):
    w = params[name + ".weight"]
    if cfg.normalization == "RMSNorm":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_epsilon) * w
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_epsilon) * w + params[name + ".bias"]


def _linear(x, params, name):
    y = x @ params[name + ".weight"].T
    return y + params[name + ".bias"] if name + ".bias" in params else y


def _gelu_erf(x):
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def _activation(cfg, h):
    act = cfg.hidden_act
    if act == "swiglu":
        gate, up = np.split(h, 2, -1)  # full-tensor layout [gate; up]
        return gate / (1 + np.exp(-gate)) * up
    if act == "gelu_tanh" or (act == "gelu" and cfg.bias_gelu_fusion and cfg.add_bias_linear):
        return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    if act == "gelu":
        return _gelu_erf(h)
    if act == "squared_relu":
        return np.maximum(h, 0) ** 2
    return h / (1 + np.exp(-h))


def _rope(x, cfg):
    """x [b, s, n, hn]: rotate the first rotary_dim channels (pairs i, i + d/2) by position * base^(-2i/d)."""
    d = int(cfg.kv_channels * cfg.rotary_percent)
    s = x.shape[1]
    inv = cfg.rotary_base ** (-np.arange(0, d, 2) / d)
    ang = np.arange(s)[:, None] * inv[None, :]  # [s, d/2]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    a, b2, rest = x[..., :d // 2], x[..., d // 2:d], x[..., d:]
    return np.concatenate([a * cos - b2 * sin, b2 * cos + a * sin, rest], -1)


def _attention(cfg, x, params, name, mask):
    b, s, _ = x.shape
    n, g, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per = n // g
    qkv = _linear(x, params, name + "query_key_value").reshape(b, s, g, per + 2, hn)
    q = qkv[:, :, :, :per].reshape(b, s, n, hn)
    k, v = qkv[:, :, :, per], qkv[:, :, :, per + 1]  # [b, s, g, hn]
    if cfg.position_embedding_type == "rope":
        q, k = _rope(q, cfg), _rope(k, cfg)
    k, v = np.repeat(k, per, axis=2), np.repeat(v, per, axis=2)  # query head j uses group j // per
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(hn)
    scores = np.where(mask, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, n * hn)
    return _linear(ctx, params, name + "dense")


def reference_logits(cfg, params: dict, tokens, position_ids=None, attention_mask=None):
    """Logits [b, s, vocab] of the model `cfg` with full weights `params` (float64 arithmetic)."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    tokens = np.asarray(tokens)
    b, s = tokens.shape
    x = params["language_model.embedding.word_embeddings.weight"][tokens]
    if cfg.position_embedding_type == "learned_absolute":
        pos = np.tile(np.arange(s), (b, 1)) if position_ids is None else np.asarray(position_ids)
        x = x + params["language_model.embedding.position_embeddings.weight"][pos]
    mask = np.triu(np.ones((s, s), bool), 1)[None, None] if attention_mask is None else np.asarray(attention_mask)
    for i in range(cfg.num_layers):
        name = PREFIX.format(i)
        attn = _attention(cfg, _norm(cfg, x, params, name + "input_norm"), params, name + "self_attention.", mask)
        if cfg.use_sandwich_norm:
            attn = _norm(cfg, attn, params, name + "attn_post_norm")
        x = x + attn
        normed = _norm(cfg, x, params, name + "post_attention_norm")
        if cfg.moe_config.is_moe_layer(i, cfg.num_layers):
            from reference_moe import moe_mlp

            mlp = moe_mlp(cfg.moe_config, normed.transpose(1, 0, 2), params, name + "mlp.",
                          lambda h: _activation(cfg, h)).transpose(1, 0, 2)  # [s, b, h] token order
        else:
            h = _linear(normed, params, name + "mlp.dense_h_to_4h")
            mlp = _linear(_activation(cfg, h), params, name + "mlp.dense_4h_to_h")
        if cfg.use_sandwich_norm:
            mlp = _norm(cfg, mlp, params, name + "ffn_post_norm")
        x = x + mlp
    x = _norm(cfg, x, params, "language_model.encoder.final_norm")
    out = params["language_model.output_layer.weight" if cfg.untie_embeddings_and_output_weights
                 else "language_model.embedding.word_embeddings.weight"]
    return x @ out.T


def reference_loss(logits, labels, loss_mask=None):
    """Masked mean token cross entropy (float64)."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
    mask = np.ones_like(nll) if loss_mask is None else np.asarray(loss_mask, np.float64)
    return (nll * mask).sum() / mask.sum()
