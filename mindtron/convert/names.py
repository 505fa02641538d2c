"""Canonical tensor names: the converter's layout-free vocabulary for a GPT model.

A canonical name is the name GPTModel gives the parameter in a single-process model (Megatron's legacy
names with the newer `*_norm` spelling), with the global layer index:

    language_model.embedding.word_embeddings.weight                      [padded vocab, h]
    language_model.embedding.position_embeddings.weight                  [max positions, h]  (learned)
    language_model.encoder.layers.{i}.input_norm.{weight,bias}           [h]
    language_model.encoder.layers.{i}.self_attention.query_key_value.*   [(np + 2 ng) hn, h], grouped rows
    language_model.encoder.layers.{i}.self_attention.dense.*             [h, np hn]
    language_model.encoder.layers.{i}.post_attention_norm.{weight,bias}  [h]
    language_model.encoder.layers.{i}.mlp.dense_h_to_4h.*                [ffn (x2 for SwiGLU: [gate; up]), h]
    language_model.encoder.layers.{i}.mlp.dense_4h_to_h.*                [h, ffn]
    language_model.encoder.layers.{i}.{attn,ffn}_post_norm.*             (mindtron's sandwich norm)
    language_model.encoder.final_norm.{weight,bias}                      [h]
    language_model.output_layer.weight                                   [padded vocab, h]  (untied)

The fused QKV rows are grouped per key/value group: the group's np/ng query heads, then its key head, then
its value head (Megatron's layout since checkpoint version 2, and Megatron-Core's). `HEAD_COPY` is the last
pipeline stage's copy of a tied word embedding; it is not part of the whole model.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

WORD = "language_model.embedding.word_embeddings.weight"
POSITION = "language_model.embedding.position_embeddings.weight"
LAYER_PREFIX = "language_model.encoder.layers."
FINAL_NORM = "language_model.encoder.final_norm."
OUTPUT = "language_model.output_layer.weight"
HEAD_COPY = "word_embeddings_for_head.weight"

LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$")
LAYER_PARTS = re.compile(
    r"^(input_norm\.(weight|bias)|post_attention_norm\.(weight|bias)|attn_post_norm\.(weight|bias)|"
    r"ffn_post_norm\.(weight|bias)|self_attention\.(query_key_value|dense)\.(weight|bias)|"
    r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.(weight|bias))$")
GLOBAL_NAMES = {WORD, POSITION, FINAL_NORM + "weight", FINAL_NORM + "bias", OUTPUT, HEAD_COPY}


def is_canonical(name: str) -> bool:
    """Whether `name` is a canonical name (with any layer index) or the head copy."""
    if name in GLOBAL_NAMES:
        return True
    match = LAYER.match(name)
    return bool(match and LAYER_PARTS.match(match.group(2)))


def layer_of(name: str) -> Optional[Tuple[int, str]]:
    """(layer index, rest of the name) for a layer's tensor, else None."""
    match = LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_name(index: int, rest: str) -> str:
    """The name of `rest` (for example 'mlp.dense_4h_to_h.weight') in layer `index`."""
    return f"{LAYER_PREFIX}{index}.{rest}"


def shift_layer(name: str, offset: int) -> str:
    """`name` with its layer index moved by `offset` (unchanged for non-layer tensors)."""
    parsed = layer_of(name)
    return name if parsed is None else layer_name(parsed[0] + offset, parsed[1])


def expected_shapes(config, vocab_rows: int) -> Dict[str, Tuple[int, ...]]:
    """Every canonical tensor of the whole model `config` describes, with its full shape."""
    c = config
    h, hn = c.hidden_size, c.kv_channels
    qkv_rows = (c.num_attention_heads + 2 * c.num_query_groups) * hn
    fc1_rows = c.ffn_hidden_size * (2 if c.hidden_act == "swiglu" else 1)
    norm_parts = ("weight", "bias") if c.normalization == "LayerNorm" else ("weight",)
    shapes: Dict[str, Tuple[int, ...]] = {WORD: (vocab_rows, h)}
    if c.position_embedding_type == "learned_absolute":
        shapes[POSITION] = (c.max_position_embeddings, h)
    norms = ["input_norm", "post_attention_norm"] + (["attn_post_norm", "ffn_post_norm"] if c.use_sandwich_norm else [])
    for i in range(c.num_layers):
        for norm in norms:
            for part in norm_parts:
                shapes[layer_name(i, f"{norm}.{part}")] = (h,)
        shapes[layer_name(i, "self_attention.query_key_value.weight")] = (qkv_rows, h)
        if c.qkv_has_bias:
            shapes[layer_name(i, "self_attention.query_key_value.bias")] = (qkv_rows,)
        shapes[layer_name(i, "self_attention.dense.weight")] = (h, c.num_attention_heads * hn)
        if c.out_proj_has_bias:
            shapes[layer_name(i, "self_attention.dense.bias")] = (h,)
        shapes[layer_name(i, "mlp.dense_h_to_4h.weight")] = (fc1_rows, h)
        shapes[layer_name(i, "mlp.dense_4h_to_h.weight")] = (h, c.ffn_hidden_size)
        if c.add_bias_linear:
            shapes[layer_name(i, "mlp.dense_h_to_4h.bias")] = (fc1_rows,)
            shapes[layer_name(i, "mlp.dense_4h_to_h.bias")] = (h,)
    for part in norm_parts:
        shapes[FINAL_NORM + part] = (h,)
    if c.untie_embeddings_and_output_weights:
        shapes[OUTPUT] = (vocab_rows, h)
    return shapes


# Which settings decide a tensor's presence or shape: named in errors so the user knows what to change.
_HINTS = [
    (re.compile(r"query_key_value\.weight$"), "--num-attention-heads, --num-query-groups (with "
                                               "--group-query-attention), --kv-channels, --hidden-size"),
    (re.compile(r"query_key_value\.bias$"), "--add-qkv-bias / --disable-bias-linear"),
    (re.compile(r"self_attention\.dense\.weight$"), "--num-attention-heads, --kv-channels, --hidden-size"),
    (re.compile(r"self_attention\.dense\.bias$"), "--disable-bias-linear"),
    (re.compile(r"dense_h_to_4h\.weight$"), "--ffn-hidden-size, --swiglu, --hidden-size"),
    (re.compile(r"dense_(h_to_4h|4h_to_h)\.bias$"), "--disable-bias-linear"),
    (re.compile(r"dense_4h_to_h\.weight$"), "--ffn-hidden-size, --hidden-size"),
    (re.compile(r"(attn|ffn)_post_norm"), "--use-sandwich-norm"),
    (re.compile(r"norm\.bias$"), "--normalization (LayerNorm has a bias, RMSNorm none)"),
    (re.compile(r"norm\.weight$"), "--hidden-size"),
    (re.compile(r"position_embeddings"), "--position-embedding-type, --max-position-embeddings"),
    (re.compile(r"output_layer"), "--untie-embeddings-and-output-weights"),
    (re.compile(r"word_embeddings"), "--hidden-size, the vocabulary size"),
]


def setting_hint(name: str) -> str:
    """The command-line settings that decide whether `name` exists and its shape."""
    for pattern, hint in _HINTS:
        if pattern.search(name):
            return hint
    return "the model settings"


# Entries of a model state dict that hold no weights of the model: skipped, and listed in the summary.
IGNORED = [
    (re.compile(r"(^|\.)_extra_state(\.|$)"), "Transformer Engine FP8 metadata (_extra_state)"),
    (re.compile(r"(^|\.)inv_freq$"), "rotary frequencies (recomputed from --rotary-base)"),
]


def ignore_reason(key: str) -> Optional[str]:
    """Why the state-dict entry `key` is skipped, or None when it must be placed."""
    for pattern, reason in IGNORED:
        if pattern.search(key):
            return reason
    return None
