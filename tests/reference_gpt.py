"""An independent float64 numpy GPT, written from the maths (not from mindtron's modules), to check
GPTModel's logits. Inputs are batch-first [b, s]; weights are the full (unsharded) tensors by their
Megatron names."""
import numpy as np

PREFIX = "language_model.encoder.layers.{}."


def _norm(cfg, x, params, name):
    w = params[name + ".weight"]
    if getattr(cfg, "layernorm_zero_centered_gamma", False):
        w = w + 1.0  # --apply-layernorm-1p stores gamma - 1
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


def _glu(cfg, h, act):
    gate, up = np.split(h, 2, -1)  # full-tensor layout [gate; up]
    c = getattr(cfg, "activation_func_clamp_value", None)
    if c is not None:
        gate, up = np.minimum(gate, c), np.clip(up, -c, c)
    return act(gate) * (up + getattr(cfg, "glu_linear_offset", 0.0))


def _activation(cfg, h):
    act = cfg.hidden_act
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    if act == "quick_geglu":
        return _glu(cfg, h, lambda g: g * sigmoid(1.702 * g))
    if act == "swiglu":
        if not getattr(cfg, "bias_swiglu_fusion", True):  # Megatron's unfused GLU: clamp and offset apply
            return _glu(cfg, h, lambda g: g * sigmoid(g))
        gate, up = np.split(h, 2, -1)
        return gate * sigmoid(gate) * up
    if act == "gelu_tanh" or (act == "gelu" and cfg.bias_gelu_fusion and cfg.add_bias_linear):
        return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    if act == "gelu":
        return _gelu_erf(h)
    if act == "squared_relu":
        return np.maximum(h, 0) ** 2
    return h / (1 + np.exp(-h))


def _llama3_freqs(inv, factor):
    """Llama 3.x: wavelengths above 8192 / 1 positions slowed by `factor`, below 8192 / 4 kept, a linear blend
    in (8192 / wavelength) between."""
    wavelength = 2 * np.pi / inv
    t = (8192.0 / wavelength - 1.0) / (4.0 - 1.0)  # 0 at the low-frequency edge, 1 at the high one
    blend = (1 - t) * inv / factor + t * inv
    return np.where(wavelength > 8192.0, inv / factor, np.where(wavelength < 2048.0, inv, blend))


def _yarn_freqs(cfg, d):
    """YaRN over d channels: each pair's frequency moves from base^(-2i/d) / s (pairs with few rotations
    over the original context) to base^(-2i/d) (many rotations), ramping over the pairs between the
    beta_slow- and beta_fast-rotation channels."""
    base, s, ctx = float(cfg.rotary_base), cfg.yarn_rotary_scaling_factor, cfg.yarn_original_max_position_embeddings
    original = base ** (-np.arange(0, d, 2) / d)

    def channel_of(rotations):  # the channel whose wavelength fits `rotations` times into the context
        return d * np.log(ctx / (2 * np.pi * rotations)) / (2 * np.log(base))
    lo, hi = channel_of(cfg.yarn_beta_fast), channel_of(cfg.yarn_beta_slow)
    if cfg.yarn_correction_range_round_to_int:
        lo, hi = np.floor(lo), np.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    hi = hi + 0.001 if hi == lo else hi
    interpolated_share = np.clip((np.arange(d // 2) - lo) / (hi - lo), 0.0, 1.0)
    return original / s * interpolated_share + original * (1 - interpolated_share)


def _yarn_temperature(cfg):
    s = cfg.yarn_rotary_scaling_factor
    if s <= 1:
        return 1.0
    return (0.1 * cfg.yarn_mscale * np.log(s) + 1.0) / (0.1 * cfg.yarn_mscale_all_dim * np.log(s) + 1.0)


def _rope(x, cfg):
    """x [b, s, n, hn]: rotate the first rotary_dim channels (pairs (i, i + d/2), or (2i, 2i + 1) interleaved)
    by position * frequency_i, frequencies as the config's RoPE variant defines them."""
    yarn = cfg.position_embedding_type == "yarn"
    d = cfg.kv_channels if yarn else int(cfg.kv_channels * cfg.rotary_percent)
    s = x.shape[1]
    inv = cfg.rotary_base ** (-np.arange(0, d, 2) / d)
    positions = np.arange(s, dtype=np.float64)
    scale = 1.0
    if yarn:
        inv, scale = _yarn_freqs(cfg, d), _yarn_temperature(cfg)
    else:
        if getattr(cfg, "use_rope_scaling", False):
            inv = _llama3_freqs(inv, cfg.rope_scaling_factor)
        if getattr(cfg, "rotary_seq_len_interpolation_factor", None):
            positions = positions / cfg.rotary_seq_len_interpolation_factor
    ang = positions[:, None] * inv[None, :]  # [s, d/2]
    cos, sin = scale * np.cos(ang)[None, :, None, :], scale * np.sin(ang)[None, :, None, :]
    if getattr(cfg, "rotary_interleaved", False):
        a, b2 = x[..., 0:d:2], x[..., 1:d:2]
        out = np.empty_like(x[..., :d])
        out[..., 0::2], out[..., 1::2] = a * cos - b2 * sin, b2 * cos + a * sin
        return np.concatenate([out, x[..., d:]], -1)
    a, b2, rest = x[..., :d // 2], x[..., d // 2:d], x[..., d:]
    return np.concatenate([a * cos - b2 * sin, b2 * cos + a * sin, rest], -1)


def _layer_flag(freq, layer, every_nth_value):
    """Megatron's per-layer frequency options: an int N marks layers N, 2N, ... (1-based) with
    `every_nth_value`, a list gives the value per layer."""
    if freq is None:
        return None
    if isinstance(freq, int):
        return every_nth_value if (layer + 1) % freq == 0 else 1 - every_nth_value
    return freq[layer]


def _head_norm(cfg, x, params, name):
    if getattr(cfg, "qk_l2_norm", False):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_epsilon)
    if getattr(cfg, "qk_layernorm", False):
        return _norm(cfg, x, params, name)
    return x


def _attention(cfg, x, params, name, mask, layer):
    b, s, _ = x.shape
    n, g, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per = n // g
    gated = getattr(cfg, "attention_output_gate", False)
    # each key/value group's rows: its query heads, (their gates,) its key head, its value head
    qkv = _linear(x, params, name + "query_key_value").reshape(b, s, g, per * (2 if gated else 1) + 2, hn)
    q = qkv[:, :, :, :per].reshape(b, s, n, hn)
    gate = qkv[:, :, :, per:2 * per].reshape(b, s, n * hn) if gated else None
    k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [b, s, g, hn]
    q, k = _head_norm(cfg, q, params, name + "q_layernorm"), _head_norm(cfg, k, params, name + "k_layernorm")
    rope = cfg.position_embedding_type in ("rope", "yarn")
    if rope and not _layer_flag(getattr(cfg, "no_rope_freq", None), layer, 1):
        q, k = _rope(q, cfg), _rope(k, cfg)
    k, v = np.repeat(k, per, axis=2), np.repeat(v, per, axis=2)  # query head j uses group j // per
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(hn)
    window = getattr(cfg, "window_size", None)
    if window and _layer_flag(getattr(cfg, "window_attn_skip_freq", None), layer, 0) in (None, 1):
        i, j = np.arange(s)[:, None], np.arange(s)[None, :]
        too_far = (j < i - window[0]) if window[0] >= 0 else np.zeros((s, s), bool)
        mask = mask | too_far[None, None]
    scores = np.where(mask, -np.inf, scores)
    softmax_type = getattr(cfg, "softmax_type", "vanilla")
    # off-by-one / learnable: exp(offset_h) joins each row's denominator
    offset = {"vanilla": None, "off-by-one": np.zeros(n),
              "learnable": params.get(name + "core_attention.softmax_offset")}[softmax_type]
    top = scores.max(-1, keepdims=True)
    if offset is not None:
        top = np.maximum(top, offset[None, :, None, None])
    probs = np.exp(scores - top)
    denominator = probs.sum(-1, keepdims=True)
    if offset is not None:
        denominator = denominator + np.exp(offset[None, :, None, None] - top)
    probs /= denominator
    ctx = np.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, n * hn)
    if gated:
        ctx = ctx / (1.0 + np.exp(-gate))
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
        attn = _attention(cfg, _norm(cfg, x, params, name + "input_norm"), params, name + "self_attention.", mask,
                          i)
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


def reference_loss(logits, labels, loss_mask=None, per_token=False):
    """Masked mean token cross entropy (float64); the masked sum with `per_token`."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
    mask = np.ones_like(nll) if loss_mask is None else np.asarray(loss_mask, np.float64)
    return (nll * mask).sum() / (1.0 if per_token else mask.sum())
