"""Megatron-Core GPT state dicts and the canonical names (both ways).

Megatron-Core keeps a flat state dict per pipeline stage (layers numbered from 0 on each stage):

    embedding.word_embeddings.weight, embedding.position_embeddings.weight
    decoder.layers.N.input_layernorm.*            or, with Transformer Engine's fused norm + linear,
    decoder.layers.N.self_attention.linear_qkv.layer_norm_{weight,bias}
    decoder.layers.N.self_attention.linear_qkv.{weight,bias}     (grouped QKV rows, as mindtron's)
    decoder.layers.N.self_attention.linear_proj.{weight,bias}
    decoder.layers.N.pre_mlp_layernorm.*          or decoder.layers.N.mlp.linear_fc1.layer_norm_{weight,bias}
    decoder.layers.N.mlp.linear_fc1.{weight,bias}                ([gate; up] per shard with SwiGLU)
    decoder.layers.N.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}
    output_layer.weight                           (untied; or, tied with pp > 1, the last stage's copy)
    *._extra_state                                (Transformer Engine metadata, no weights)

Mixture-of-Experts layers add `mlp.router.*`, `mlp.experts.local_experts.E.*` and `mlp.shared_experts.*`;
mindtron's GPT has no MoE layer yet, so they have no canonical name (`is_moe_name` tells them apart from
unknown tensors). Converting MoE checkpoints means adding their names here.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from mindtron.convert import names as N

_LAYER_RULES = [
    (r"input_layernorm\.(weight|bias)", "input_norm.{0}"),
    (r"self_attention\.linear_qkv\.layer_norm_(weight|bias)", "input_norm.{0}"),
    (r"self_attention\.linear_qkv\.(weight|bias)", "self_attention.query_key_value.{0}"),
    (r"self_attention\.linear_proj\.(weight|bias)", "self_attention.dense.{0}"),
    (r"pre_mlp_layernorm\.(weight|bias)", "post_attention_norm.{0}"),
    (r"mlp\.linear_fc1\.layer_norm_(weight|bias)", "post_attention_norm.{0}"),
    (r"mlp\.linear_fc1\.(weight|bias)", "mlp.dense_h_to_4h.{0}"),
    (r"mlp\.linear_fc2\.(weight|bias)", "mlp.dense_4h_to_h.{0}"),
]
_LAYER_RULES = [(re.compile(rf"^decoder\.layers\.(\d+)\.{pattern}$"), target) for pattern, target in _LAYER_RULES]
_FINAL_NORM = re.compile(r"^decoder\.final_(?:layer)?norm\.(weight|bias)$")


def canonical_name(key: str, tied: bool) -> Optional[str]:
    """The canonical (stage-local) name of a Megatron-Core key, or None when it has none. With tied
    embeddings `output_layer.weight` is the last stage's copy of the word embedding."""
    if key == "embedding.word_embeddings.weight":
        return N.WORD
    if key == "embedding.position_embeddings.weight":
        return N.POSITION
    if key == "output_layer.weight":
        return N.HEAD_COPY if tied else N.OUTPUT
    match = _FINAL_NORM.match(key)
    if match:
        return N.FINAL_NORM + match.group(1)
    for pattern, target in _LAYER_RULES:
        match = pattern.match(key)
        if match:
            return N.layer_name(int(match.group(1)), target.format(match.group(2)))
    return None


def is_core_state(model: Mapping[str, Any]) -> bool:
    """Whether a model state dict has Megatron-Core's flat structure."""
    return any(str(k).startswith(("decoder.", "embedding.", "output_layer.")) for k in model)


_MOE = re.compile(r"^decoder\.layers\.\d+\.mlp\.(router|experts|shared_experts)\.")


def is_moe_name(key: str) -> bool:
    """Whether a (per-layer) Megatron-Core key belongs to a Mixture-of-Experts layer."""
    return bool(_MOE.match(key))


_TO_CORE = [
    ("input_norm.", "self_attention.linear_qkv.layer_norm_"),
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("post_attention_norm.", "mlp.linear_fc1.layer_norm_"),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
]


def core_name(name: str) -> str:
    """The Megatron-Core key of canonical tensor `name`, with the norms under Transformer Engine's fused names
    (how torch_dist checkpoints store them for either layer spec); ValueError for a tensor Megatron lacks."""
    if name == N.WORD:
        return "embedding.word_embeddings.weight"
    if name == N.POSITION:
        return "embedding.position_embeddings.weight"
    if name == N.OUTPUT:
        return "output_layer.weight"
    if name.startswith(N.FINAL_NORM):
        return "decoder.final_layernorm." + name[len(N.FINAL_NORM):]
    parsed = N.layer_of(name)
    if parsed is not None:
        for canonical, core in _TO_CORE:
            if parsed[1].startswith(canonical):
                return f"decoder.layers.{parsed[0]}.{core}{parsed[1][len(canonical):]}"
    raise ValueError(f"{name} has no place in Megatron-Core's GPT (sandwich norms are mindtron's own); this model "
                     "cannot be written as a Megatron checkpoint")
