"""Megatron's torch_dist keys and per-layer Megatron-Core keys (both ways).

A torch_dist checkpoint holds every per-layer tensor once, stacked over the layers of the whole model (a
leading `num_layers` dimension, the layer index dropped from the key), and expert tensors stacked again over
the global experts:

    decoder.layers.self_attention.linear_qkv.weight         [L, qkv rows, h]   -> decoder.layers.{l}.self_attention...
    decoder.layers.mlp.experts.experts.linear_fc1.weight    [L, E, rows, h]    -> decoder.layers.{l}.mlp.experts.
                                                                                   local_experts.{e}.linear_fc1.weight
    embedding.word_embeddings.weight, decoder.final_layernorm.*, output_layer.weight   unchanged

When the layers differ (Megatron-Core's `non_homogeneous_layers`: `--moe-layer-freq` a list or above 1), each
layer keeps its own keys, with its global index and no layer dimension
(`decoder.layers.3.mlp.experts.experts.linear_fc1.weight` [E, rows, h]); with `singleton_local_shards` each
expert is its own key too (`decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight`).

Unstacked, the keys are the ones a torch-format Megatron-Core checkpoint of one pipeline stage and one
expert-parallel rank would hold (`names_core` maps those), with global layer and expert indices.
Transformer Engine's `_extra_state` objects are keyed `<module>._extra_state/shard_<offsets>_<shape>`
(`shard_<layer>_<L>` for a stacked layer module, `shard_<layer>.<expert>_<L>.<E>` for a stacked expert's).
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

STACKED = "decoder.layers."
EXPERTS = "mlp.experts.experts."
LOCAL_EXPERTS = "mlp.experts.local_experts."
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_INDEX = re.compile(r"^(\d+)\.(.+)$")
# Modules of a Transformer Engine GPT layer that carry an _extra_state object (FP8 metadata; None without FP8).
TE_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
                          "mlp.linear_fc1", "mlp.linear_fc2")
# Those of an MoE layer: attention's, then each expert's and the shared expert's linear layers.
TE_MOE_ATTENTION_MODULES = TE_EXTRA_STATE_MODULES[:3]
TE_EXPERT_MODULES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
TE_SHARED_EXPERT_MODULES = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")


def is_stacked(key: str) -> bool:
    """Whether the torch_dist tensor `key` has a leading layer dimension."""
    return key.startswith(STACKED) and _LAYER_KEY.match(key) is None


def _rest(key: str) -> str:
    match = _LAYER_KEY.match(key)
    return match.group(2) if match else key[len(STACKED):]


def is_expert_stack(key: str) -> bool:
    """Whether the torch_dist tensor `key` is stacked over experts ([L, E, ...], or [E, ...] per layer)."""
    rest = _rest(key) if key.startswith(STACKED) else ""
    return rest.startswith(EXPERTS) and _EXPERT_INDEX.match(rest[len(EXPERTS):]) is None


def layer_key(key: str, layer: int, expert: int = 0) -> str:
    """The per-layer (and, for expert stacks, per-expert) Megatron-Core key of one slice of `key` (`layer` and
    `expert` are used where the key has no index of its own)."""
    if not key.startswith(STACKED):
        return key
    match = _LAYER_KEY.match(key)
    if match:
        layer = int(match.group(1))
    rest = _rest(key)
    if rest.startswith(EXPERTS):
        tail = rest[len(EXPERTS):]
        own = _EXPERT_INDEX.match(tail)
        if own:
            expert, tail = int(own.group(1)), own.group(2)
        return f"{STACKED}{layer}.{LOCAL_EXPERTS}{expert}.{tail}"
    return f"{STACKED}{layer}.{rest}"


def unstack(key: str, tensor: np.ndarray, layers: Sequence[int]) -> Iterator[Tuple[str, np.ndarray]]:
    """(per-layer key, slice) for each of `layers` of a stacked tensor (each expert of an expert stack);
    (key, tensor) for one that is not stacked."""
    slices = [(int(layer), tensor[layer]) for layer in layers] if is_stacked(key) else [(0, tensor)]
    for layer, piece in slices:
        if is_expert_stack(key):
            for expert in range(piece.shape[0]):
                yield layer_key(key, layer, expert), piece[expert]
        else:
            yield layer_key(key, layer), piece


def stack(per_layer: Mapping[str, np.ndarray], num_layers: int, homogeneous: bool = True) -> Dict[str, np.ndarray]:
    """torch_dist tensors from per-layer keys `decoder.layers.{l}.<rest>` (layers 0..num_layers-1): stacked
    over the layers when `homogeneous` (every layer alike), else kept per layer, as Megatron-Core stores them."""
    out: Dict[str, np.ndarray] = {}
    groups: Dict[str, Dict[int, np.ndarray]] = {}
    for key, tensor in per_layer.items():
        match = _LAYER_KEY.match(key)
        if match is None or not homogeneous:
            out[key] = tensor
        elif match.group(2).startswith(LOCAL_EXPERTS):
            raise ValueError(f"{key}: torch_dist stores the experts of a layer stacked (mlp.experts.experts.*)")
        else:
            groups.setdefault(STACKED + match.group(2), {})[int(match.group(1))] = tensor
    for key, layers in groups.items():
        if sorted(layers) != list(range(num_layers)):
            raise ValueError(f"{key} exists in layers {sorted(layers)}, not in all {num_layers}: every layer of a "
                             "torch_dist checkpoint without --moe-layer-freq patterns has the same tensors")
        out[key] = np.stack([layers[i] for i in range(num_layers)])
    return out


def extra_state_keys(num_layers: int, moe_layers: Sequence[int] = (), num_experts: int = 0,
                     shared_expert: bool = False, homogeneous: bool = True) -> List[str]:
    """The keys of the Transformer Engine _extra_state objects of a GPT with `num_layers` layers, of which
    `moe_layers` hold `num_experts` experts (and a shared expert), keyed as Megatron-Core's sharded state dict
    keys them (stacked over layers when `homogeneous`)."""
    keys = []
    for layer in range(num_layers):
        moe = layer in moe_layers
        modules = TE_MOE_ATTENTION_MODULES + (TE_SHARED_EXPERT_MODULES if shared_expert else ()) if moe \
            else TE_EXTRA_STATE_MODULES
        for module in modules:
            keys.append(f"{STACKED}{module}._extra_state/shard_{layer}_{num_layers}" if homogeneous
                        else f"{STACKED}{layer}.{module}._extra_state/shard_0_1")
        for module in (TE_EXPERT_MODULES if moe else ()):
            for expert in range(num_experts):
                keys.append(f"{STACKED}{module}._extra_state/shard_{layer}.{expert}_{num_layers}.{num_experts}"
                            if homogeneous else f"{STACKED}{layer}.{module}._extra_state/shard_{expert}_{num_experts}")
    return keys
