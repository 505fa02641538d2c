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

Mixture-of-Experts layers (their norm is `pre_mlp_layernorm`, never fused with Transformer Engine) hold

    decoder.layers.N.mlp.router.{weight,bias,expert_bias}        [E, h], [E], [E]  (replicated)
    decoder.layers.N.mlp.experts.local_experts.I.linear_fc1.*    SequentialMLP: local expert I ([gate; up])
    decoder.layers.N.mlp.experts.local_experts.I.linear_fc2.*
    decoder.layers.N.mlp.experts.linear_fc1.{weight,bias}I       TEGroupedMLP: the same per local expert
    decoder.layers.N.mlp.experts.weight1 [h, E_l x ffn_l(x2)]    legacy GroupedMLP: viewed as [E_l, h, ffn_l(x2)]
    decoder.layers.N.mlp.experts.weight2 [E_l x ffn_l, h]        viewed as [E_l, ffn_l, h] (both transposed)
    decoder.layers.N.mlp.shared_experts.linear_fc{1,2}.weight, .gate_weight

with local expert indices (the file's expert-parallel rank holds global experts ep_rank x E_l + I). Per-expert
keys map to expert pieces (`names.expert_piece`), stacked per file afterwards; the grouped GEMM's two weights
map to the stacked canonical tensors once `from_grouped_gemm` has reshaped them.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Set

import numpy as np

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
_LAYER_RULES += [
    (r"mlp\.router\.(weight|bias|expert_bias)", "mlp.router.{0}"),
    (r"mlp\.shared_experts\.linear_fc1\.(weight)", "mlp.shared_experts.dense_h_to_4h.{0}"),
    (r"mlp\.shared_experts\.linear_fc2\.(weight)", "mlp.shared_experts.dense_4h_to_h.{0}"),
    (r"mlp\.shared_experts\.(gate_weight)", "mlp.shared_experts.{0}"),
    (r"mlp\.experts\.(weight)1", "mlp.experts.dense_h_to_4h.{0}"),
    (r"mlp\.experts\.(weight)2", "mlp.experts.dense_4h_to_h.{0}"),
]
_LAYER_RULES = [(re.compile(rf"^decoder\.layers\.(\d+)\.{pattern}$"), target) for pattern, target in _LAYER_RULES]
# One routed expert's linear layer: SequentialMLP's local_experts.I.linear_fcK.P, TEGroupedMLP's linear_fcK.PI
_EXPERT_RULES = [re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.mlp\.experts\.local_experts\.(?P<index>\d+)\."
                            r"linear_fc(?P<fc>[12])\.(?P<part>weight|bias)$"),
                 re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.mlp\.experts\.linear_fc(?P<fc>[12])\."
                            r"(?P<part>weight|bias)(?P<index>\d+)$")]
_GROUPED_GEMM = re.compile(r"^decoder\.layers\.\d+\.mlp\.experts\.weight([12])$")
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
    for pattern in _EXPERT_RULES:
        match = pattern.match(key)
        if match:
            projection = "dense_h_to_4h" if match.group("fc") == "1" else "dense_4h_to_h"
            return N.expert_piece(int(match.group("layer")), int(match.group("index")),
                                  f"{projection}.{match.group('part')}")
    return None


def from_grouped_gemm(key: str, value: np.ndarray, num_local: int, hidden: int, where: str) -> np.ndarray:
    """The stacked [E_l, rows, cols] tensor of a legacy GroupedMLP weight (`...mlp.experts.weight1` [h,
    E_l x ffn_l(x2)] or `weight2` [E_l x ffn_l, h]), as GroupedMLP's forward views and uses it; other
    tensors unchanged."""
    match = _GROUPED_GEMM.match(key)
    if match is None:
        return value
    first = match.group(1) == "1"
    if value.ndim != 2 or value.shape[0 if first else 1] != hidden or value.size % (num_local * hidden):
        raise ValueError(f"{where}: {key} has shape {list(value.shape)}, which is not GroupedMLP's "
                         f"{'[hidden, experts x ffn]' if first else '[experts x ffn, hidden]'} for hidden {hidden} "
                         f"and {num_local} local experts (--num-experts, --hidden-size)")
    ffn = value.size // (num_local * hidden)
    viewed = value.reshape((num_local, hidden, ffn) if first else (num_local, ffn, hidden))
    return np.ascontiguousarray(viewed.transpose(0, 2, 1))  # per expert [out, in], as a linear layer's weight


def is_core_state(model: Mapping[str, Any]) -> bool:
    """Whether a model state dict has Megatron-Core's flat structure."""
    return any(str(k).startswith(("decoder.", "embedding.", "output_layer.")) for k in model)


_TO_CORE = [
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
    ("mlp.router.", "mlp.router."),
    ("mlp.shared_experts.dense_h_to_4h.", "mlp.shared_experts.linear_fc1."),
    ("mlp.shared_experts.dense_4h_to_h.", "mlp.shared_experts.linear_fc2."),
    ("mlp.shared_experts.gate_weight", "mlp.shared_experts.gate_weight"),
    ("mlp.experts.dense_h_to_4h.", "mlp.experts.experts.linear_fc1."),  # torch_dist's stack over experts
    ("mlp.experts.dense_4h_to_h.", "mlp.experts.experts.linear_fc2."),
]
_EXPERT_LINEAR = {"dense_h_to_4h.": "linear_fc1.", "dense_4h_to_h.": "linear_fc2."}


def moe_layers(names) -> Set[int]:
    """The layer indices (as numbered in `names`) whose MLP is MoE: those with a router."""
    return {parsed[0] for parsed in map(N.layer_of, names) if parsed is not None and parsed[1] == "mlp.router.weight"}


def core_name(name: str, transformer_engine: bool = True, moe_layer: bool = False, sharded: bool = True) -> str:
    """The Megatron-Core key of canonical tensor `name`; ValueError for a tensor Megatron lacks.

    Norms: Transformer Engine's fused names (`linear_qkv.layer_norm_*`, `linear_fc1.layer_norm_*`) with its
    layers, `input_layernorm`/`pre_mlp_layernorm` with the local ones; an MoE layer's MLP norm is
    `pre_mlp_layernorm` (Transformer Engine fuses it into no linear layer there). A torch_dist checkpoint
    (`sharded`) stores the norms under the fused names in either spec, except an MoE layer's with Transformer
    Engine, and routed experts stacked per layer (`mlp.experts.experts.linear_fc1.weight` [E, ...]); a
    torch-format state dict names the experts one by one (`core_state`)."""
    if name == N.WORD:
        return "embedding.word_embeddings.weight"
    if name == N.POSITION:
        return "embedding.position_embeddings.weight"
    if name in (N.OUTPUT, N.HEAD_COPY):  # the head copy: the last stage's output layer of a tied model
        return "output_layer.weight"
    if name.startswith(N.FINAL_NORM):
        return "decoder.final_layernorm." + name[len(N.FINAL_NORM):]
    parsed = N.layer_of(name)
    if parsed is not None:
        index, rest = parsed
        fused = transformer_engine or sharded
        if rest.startswith("input_norm."):
            norm = "self_attention.linear_qkv.layer_norm_" if fused else "input_layernorm."
            return f"decoder.layers.{index}.{norm}{rest[len('input_norm.'):]}"
        if rest.startswith("post_attention_norm."):
            fused = (sharded and not transformer_engine) if moe_layer else fused
            norm = "mlp.linear_fc1.layer_norm_" if fused else "pre_mlp_layernorm."
            return f"decoder.layers.{index}.{norm}{rest[len('post_attention_norm.'):]}"
        if N.is_expert(name) and not sharded:
            raise ValueError(f"{name} is a stack of experts; a torch-format state dict names them one by one")
        for canonical, core in _TO_CORE:
            if rest.startswith(canonical):
                return f"decoder.layers.{index}.{core}{rest[len(canonical):]}"
    raise ValueError(f"{name} has no place in Megatron-Core's GPT (sandwich norms are mindtron's own); this model "
                     "cannot be written as a Megatron checkpoint")


def core_state(stage: Mapping[str, np.ndarray], transformer_engine: bool = True) -> Dict[str, Any]:
    """One rank's tensors (canonical, stage-local names; experts stacked [E_local, ...]) as the flat
    Megatron-Core state dict of a torch-format checkpoint: experts as SequentialMLP's local_experts.I, and an
    empty `_extra_state` (None, as without FP8) beside each linear layer (and Transformer Engine's attention)."""
    moe = moe_layers(stage)
    out: Dict[str, Any] = {}
    for name, tensor in stage.items():
        parsed = N.layer_of(name)
        if parsed is not None and N.is_expert(name):
            index, rest = parsed
            local = rest[len(N.EXPERTS):]
            for projection, linear in _EXPERT_LINEAR.items():
                if local.startswith(projection):
                    for i in range(tensor.shape[0]):
                        out[f"decoder.layers.{index}.mlp.experts.local_experts.{i}.{linear}"
                            f"{local[len(projection):]}"] = tensor[i]
            continue
        out[core_name(name, transformer_engine, parsed is not None and parsed[0] in moe, sharded=False)] = tensor
    modules = set()
    for key in out:
        match = re.match(r"^(decoder\.layers\.\d+\..*(?:linear_qkv|linear_proj|linear_fc1|linear_fc2))\.", key)
        if match:
            modules.add(match.group(1))
            if transformer_engine and match.group(1).endswith("self_attention.linear_qkv"):
                modules.add(match.group(1).replace("linear_qkv", "core_attention"))
    out.update({f"{module}._extra_state": None for module in sorted(modules)})
    return out
