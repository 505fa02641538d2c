"""Tiny model configurations shared by the single-process and multi-rank GPTModel tests."""
from mindtron.legacy_model import TransformerConfig

COMMON = dict(vocab_size=128, hidden_size=32, seq_length=16, num_layers=2, attention_dropout_rate=0.0,
              hidden_dropout_rate=0.0, init_method_std=0.05)

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
}


def make_config(name: str, **overrides) -> TransformerConfig:
    return TransformerConfig(**{**COMMON, **CONFIGS[name], **overrides})
