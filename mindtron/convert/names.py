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
  in the layers --moe-layer-freq makes Mixture-of-Experts, instead of the two dense MLP projections:
    language_model.encoder.layers.{i}.mlp.router.weight                  [E, h]  (.bias [E], .expert_bias [E])
    language_model.encoder.layers.{i}.mlp.experts.dense_h_to_4h.*        [E, moe_ffn (x2: [gate; up]), h], [E, ..]
    language_model.encoder.layers.{i}.mlp.experts.dense_4h_to_h.*        [E, h, moe_ffn], bias [E, h]
    language_model.encoder.layers.{i}.mlp.shared_experts.dense_h_to_4h.weight  [shared (x2), h]
    language_model.encoder.layers.{i}.mlp.shared_experts.dense_4h_to_h.weight  [h, shared]
    language_model.encoder.layers.{i}.mlp.shared_experts.gate_weight     [1, h]
    language_model.encoder.final_norm.{weight,bias}                      [h]
    language_model.output_layer.weight                                   [padded vocab, h]  (untied)

The fused QKV rows are grouped per key/value group: the group's np/ng query heads, then its key head, then
its value head (Megatron's layout since checkpoint version 2, and Megatron-Core's). `HEAD_COPY` is the last
pipeline stage's copy of a tied word embedding; it is not part of the whole model.

Routed experts are stacked by global expert index (E = --num-experts); a shard holds a block of them (its
expert-parallel rank's, `E / EP` experts, in order). Readers name the experts of a source file one by one
with *expert pieces*, `language_model.encoder.layers.{i}.mlp.experts.local_experts.{e}.dense_h_to_4h.weight`
([moe_ffn (x2), h], e the file's local index), and `stack_expert_pieces` stacks them.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import numpy as np

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
    r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.(weight|bias)|mlp\.router\.(weight|bias|expert_bias)|"
    r"mlp\.experts\.(dense_h_to_4h|dense_4h_to_h)\.(weight|bias)|"
    r"mlp\.shared_experts\.(dense_h_to_4h\.weight|dense_4h_to_h\.weight|gate_weight))$")
EXPERTS = "mlp.experts."
EXPERT_PIECE = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\."
                          r"((?:dense_h_to_4h|dense_4h_to_h)\.(?:weight|bias))$")
GLOBAL_NAMES = {WORD, POSITION, FINAL_NORM + "weight", FINAL_NORM + "bias", OUTPUT, HEAD_COPY}


def is_canonical(name: str) -> bool:
    """Whether `name` is a canonical name (with any layer index) or the head copy."""
    if name in GLOBAL_NAMES:
        return True
    match = LAYER.match(name)
    return bool(match and LAYER_PARTS.match(match.group(2)))


def is_expert(name: str) -> bool:
    """Whether `name` is a routed-expert stack [experts, ...] (split over expert-parallel ranks by expert)."""
    parsed = layer_of(name)
    return parsed is not None and parsed[1].startswith(EXPERTS)


def expert_piece(layer: int, index: int, rest: str) -> str:
    """The expert-piece name of one expert's `rest` ('dense_h_to_4h.weight', ...) in layer `layer`."""
    return f"{LAYER_PREFIX}{layer}.{EXPERTS}local_experts.{index}.{rest}"


def stack_expert_pieces(tensors: Dict[str, np.ndarray], num_local: int, where: str,
                        origin: Optional[Dict[str, str]] = None) -> Dict[str, np.ndarray]:
    """`tensors` with the expert pieces of each layer stacked into canonical expert tensors
    [num_local, ...] (local index order); an index outside 0..num_local-1, a missing index or a misshapen
    piece is a ValueError naming the source entry (`origin`: piece name -> source key)."""
    origin = origin or {}
    out: Dict[str, np.ndarray] = {}
    groups: Dict[str, Dict[int, str]] = {}
    for name, tensor in tensors.items():
        match = EXPERT_PIECE.match(name)
        if match is None:
            out[name] = tensor
            continue
        layer, index, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        if index >= num_local:
            raise ValueError(f"{where}: {origin.get(name, name)} is local expert {index}, but each expert-parallel "
                             f"rank holds {num_local} experts (--num-experts / expert-parallel size): it has no place "
                             "in the model")
        groups.setdefault(layer_name(layer, EXPERTS + rest), {})[index] = name
    for stacked, pieces in groups.items():
        missing = sorted(set(range(num_local)) - set(pieces))
        if missing:
            raise ValueError(f"{where}: local experts {missing} of {stacked} are missing (found "
                             f"{[origin.get(pieces[i], pieces[i]) for i in sorted(pieces)][:4]}); the checkpoint is "
                             "incomplete")
        shapes = {tuple(tensors[pieces[i]].shape) for i in pieces}
        if len(shapes) > 1:
            raise ValueError(f"{where}: the experts of {stacked} have different shapes {sorted(shapes)}")
        if stacked in out:
            raise ValueError(f"{where}: {stacked} is given both stacked and expert by expert "
                             f"({origin.get(stacked, stacked)} and {origin.get(pieces[0], pieces[0])})")
        out[stacked] = np.stack([tensors[pieces[i]] for i in range(num_local)])
    return out


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
        if c.moe_config.is_moe_layer(i, c.num_layers):
            shapes.update(_moe_shapes(c, i))
            continue
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


def _moe_shapes(c, i: int) -> Dict[str, Tuple[int, ...]]:
    """The tensors of MoE layer `i`'s MLP (router, stacked experts, shared expert)."""
    moe, h = c.moe_config, c.hidden_size
    E, ffn = moe.num_experts, moe.moe_ffn_hidden_size
    glu = 2 if c.hidden_act == "swiglu" else 1
    shapes = {layer_name(i, "mlp.router.weight"): (E, h),
              layer_name(i, "mlp.experts.dense_h_to_4h.weight"): (E, glu * ffn, h),
              layer_name(i, "mlp.experts.dense_4h_to_h.weight"): (E, h, ffn)}
    if c.add_bias_linear:
        shapes.update({layer_name(i, "mlp.router.bias"): (E,),
                       layer_name(i, "mlp.experts.dense_h_to_4h.bias"): (E, glu * ffn),
                       layer_name(i, "mlp.experts.dense_4h_to_h.bias"): (E, h)})
    if moe.moe_router_enable_expert_bias:
        shapes[layer_name(i, "mlp.router.expert_bias")] = (E,)
    shared = moe.moe_shared_expert_intermediate_size
    if shared:
        shapes[layer_name(i, "mlp.shared_experts.dense_h_to_4h.weight")] = (glu * shared, h)
        shapes[layer_name(i, "mlp.shared_experts.dense_4h_to_h.weight")] = (h, shared)
        if moe.moe_shared_expert_gate:
            shapes[layer_name(i, "mlp.shared_experts.gate_weight")] = (1, h)
    return shapes


# Which settings decide a tensor's presence or shape: named in errors so the user knows what to change.
_HINTS = [
    (re.compile(r"mlp\.router\.expert_bias$"), "--moe-router-enable-expert-bias, --num-experts"),
    (re.compile(r"mlp\.router\.bias$"), "--disable-bias-linear, --num-experts"),
    (re.compile(r"mlp\.router\."), "--num-experts, --moe-layer-freq, --hidden-size"),
    (re.compile(r"mlp\.experts\..*bias$"), "--disable-bias-linear, --num-experts, --moe-ffn-hidden-size"),
    (re.compile(r"mlp\.experts\."), "--num-experts, --moe-ffn-hidden-size, --swiglu, --moe-layer-freq"),
    (re.compile(r"mlp\.shared_experts\.gate_weight$"), "--moe-shared-expert-gate"),
    (re.compile(r"mlp\.shared_experts\."), "--moe-shared-expert-intermediate-size, --swiglu"),
    (re.compile(r"query_key_value\.weight$"), "--num-attention-heads, --num-query-groups (with "
                                               "--group-query-attention), --kv-channels, --hidden-size"),
    (re.compile(r"query_key_value\.bias$"), "--add-qkv-bias / --disable-bias-linear"),
    (re.compile(r"self_attention\.dense\.weight$"), "--num-attention-heads, --kv-channels, --hidden-size"),
    (re.compile(r"self_attention\.dense\.bias$"), "--disable-bias-linear"),
    (re.compile(r"dense_h_to_4h\.weight$"), "--ffn-hidden-size, --swiglu, --hidden-size, --moe-layer-freq"),
    (re.compile(r"dense_(h_to_4h|4h_to_h)\.bias$"), "--disable-bias-linear"),
    (re.compile(r"dense_4h_to_h\.weight$"), "--ffn-hidden-size, --hidden-size, --moe-layer-freq"),
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
