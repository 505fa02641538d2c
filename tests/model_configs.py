"""Tiny model configurations shared by the single-process and multi-rank GPTModel tests, and the batch and
loss-and-gradient helpers of the single-process ones."""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindtron.legacy_model import TransformerConfig
from mindtron.parallel_core import tensor_parallel as tp

# Eager layers (jit_layers=False): the tests build many short-lived models, and compiling each costs more
# than it saves; tests/test_jit_layers.py covers compiled == eager.
COMMON = dict(vocab_size=128, hidden_size=32, seq_length=16, num_layers=2, attention_dropout_rate=0.0,
              hidden_dropout_rate=0.0, init_method_std=0.05, jit_layers=False)

CONFIGS = {
    # GPT-2: LayerNorm, (bias-)GeLU, learned positions, tied embeddings, biases.
    "gpt2": dict(num_attention_heads=4),
    # Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied, no biases.
    "llama": dict(num_attention_heads=4, group_query_attention=True, num_query_groups=2, normalization="RMSNorm",
                  hidden_act="swiglu", ffn_hidden_size=48, position_embedding_type="rope",
                  untie_embeddings_and_output_weights=True, add_bias_linear=False),
    # The rest: sandwich norm with post-norm scales, partial rotary, qkv bias only, exact GeLU, layer scaling.
    "options": dict(num_attention_heads=2, use_sandwich_norm=True, attn_post_norm_scale=0.5,
                    ffn_post_norm_scale=0.7, position_embedding_type="rope", rotary_percent=0.5,
                    add_bias_linear=False, qkv_has_bias=True, hidden_act="gelu",
                    apply_query_key_layer_scaling=True, num_layers=3),
    # GPT-OSS style: YaRN, sliding window on every other layer, learnable softmax offsets ("sinks"),
    # quick-GeGLU with clamp and offset, biases on QKV.
    "gptoss": dict(num_attention_heads=4, group_query_attention=True, num_query_groups=2, normalization="RMSNorm",
                   position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0,
                   yarn_original_max_position_embeddings=8, yarn_mscale=1.0, yarn_mscale_all_dim=0.0,
                   window_size=(3, 0), window_attn_skip_freq=2, softmax_type="learnable", hidden_act="quick_geglu",
                   activation_func_clamp_value=0.1, glu_linear_offset=1.0, ffn_hidden_size=48,
                   add_bias_linear=False, qkv_has_bias=True, untie_embeddings_and_output_weights=True),
    # Qwen3(-Next) style: QK layer norm, gated attention, zero-centred norm weights, interleaved Llama-3
    # scaled RoPE skipped on every other layer, SwiGLU.
    "qwen": dict(num_attention_heads=4, group_query_attention=True, num_query_groups=2, normalization="RMSNorm",
                 hidden_act="swiglu", ffn_hidden_size=48, position_embedding_type="rope", rotary_base=500000,
                 rotary_interleaved=True, use_rope_scaling=True, rope_scaling_factor=8.0, no_rope_freq=2,
                 qk_layernorm=True, attention_output_gate=True, layernorm_zero_centered_gamma=True,
                 add_bias_linear=False, untie_embeddings_and_output_weights=True),
    # The remaining options: L2 query/key norm, interpolated partial RoPE, off-by-one softmax, Glorot
    # initialisation with a separate embedding std, unfused SwiGLU with clamp and offset, LayerNorm-1p
    # with sandwich norms, a window on every layer.
    "options2": dict(num_attention_heads=4, qk_l2_norm=True, position_embedding_type="rope", rotary_percent=0.5,
                     rotary_seq_len_interpolation_factor=2.0, softmax_type="off-by-one",
                     init_method_xavier_uniform=True, embedding_init_method_std=0.5, hidden_act="swiglu",
                     bias_swiglu_fusion=False, activation_func_clamp_value=0.05, glu_linear_offset=0.5, ffn_hidden_size=48,
                     layernorm_zero_centered_gamma=True, use_sandwich_norm=True, attn_post_norm_scale=0.5,
                     window_size=(5, -1)),
}


def make_config(name: str, **overrides) -> TransformerConfig:
    return TransformerConfig(**{**COMMON, **CONFIGS[name], **overrides})


def batch(cfg: TransformerConfig, seed: int = 0, b: int = 2):
    """Random tokens [b, seq] and their next-token labels (the tokens rolled left by one)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (b, cfg.seq_length))
    return tokens, np.roll(tokens, -1, 1)


def loss_and_grads(model, tokens, labels):
    """One training-mode forward and backward: (loss, {parameter name: gradient})."""
    model.set_train(True)
    params = model.trainable_params()

    def f():
        with tp.forward_pass():
            return model(Tensor(tokens, ms.int32), labels=Tensor(labels, ms.int32))
    loss, grads = ms.value_and_grad(f, None, params)()
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}
