"""Megatron's torch_dist keys and per-layer Megatron-Core keys (both ways).

A torch_dist checkpoint holds every per-layer tensor once, stacked over the layers of the whole model (a
leading `num_layers` dimension, the layer index dropped from the key), and expert tensors stacked again over
the global experts:

    decoder.layers.self_attention.linear_qkv.weight         [L, qkv rows, h]   -> decoder.layers.{l}.self_attention...
    decoder.layers.mlp.experts.experts.linear_fc1.weight    [L, E, rows, h]    -> decoder.layers.{l}.mlp.experts.
                                                                                   local_experts.{e}.linear_fc1.weight
    embedding.word_embeddings.weight, decoder.final_layernorm.*, output_layer.weight   unchanged

Unstacked, the keys are the ones a torch-format Megatron-Core checkpoint of one pipeline stage and one
expert-parallel rank would hold (`names_core` maps those), with global layer and expert indices.
Transformer Engine's `_extra_state` objects are keyed `<module>._extra_state/shard_<layer>_<L>`.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

STACKED = "decoder.layers."
EXPERTS = "mlp.experts.experts."
LOCAL_EXPERTS = "mlp.experts.local_experts."
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Modules of a Transformer Engine GPT layer that carry an _extra_state object (FP8 metadata; None without FP8).
TE_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
                          "mlp.linear_fc1", "mlp.linear_fc2")


def is_stacked(key: str) -> bool:
    """Whether the torch_dist tensor `key` has a leading layer dimension."""
    return key.startswith(STACKED)


def is_expert_stack(key: str) -> bool:
    """Whether the torch_dist tensor `key` is stacked over experts too ([L, E, ...])."""
    return key.startswith(STACKED + EXPERTS)


def layer_key(key: str, layer: int, expert: int = 0) -> str:
    """The per-layer (and, for expert stacks, per-expert) Megatron-Core key of one slice of `key`."""
    if not is_stacked(key):
        return key
    rest = key[len(STACKED):]
    if rest.startswith(EXPERTS):
        return f"{STACKED}{layer}.{LOCAL_EXPERTS}{expert}.{rest[len(EXPERTS):]}"
    return f"{STACKED}{layer}.{rest}"


def unstack(key: str, tensor: np.ndarray, layers: Sequence[int]) -> Iterator[Tuple[str, np.ndarray]]:
    """(per-layer key, slice) for each of `layers` of a stacked tensor (each expert of an expert stack);
    (key, tensor) for one that is not stacked."""
    if not is_stacked(key):
        yield key, tensor
        return
    for layer in layers:
        if is_expert_stack(key):
            for expert in range(tensor.shape[1]):
                yield layer_key(key, int(layer), expert), tensor[layer, expert]
        else:
            yield layer_key(key, int(layer)), tensor[layer]


def stack(per_layer: Mapping[str, np.ndarray], num_layers: int) -> Dict[str, np.ndarray]:
    """torch_dist tensors from per-layer Megatron-Core keys (layers 0..num_layers-1, every layer alike)."""
    out: Dict[str, np.ndarray] = {}
    groups: Dict[str, Dict[int, np.ndarray]] = {}
    for key, tensor in per_layer.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = tensor
        elif match.group(2).startswith(LOCAL_EXPERTS):
            raise ValueError(f"{key}: writing expert tensors to torch_dist is not supported yet")
        else:
            groups.setdefault(STACKED + match.group(2), {})[int(match.group(1))] = tensor
    for key, layers in groups.items():
        if sorted(layers) != list(range(num_layers)):
            raise ValueError(f"{key} exists in layers {sorted(layers)}, not in all {num_layers}: every layer of a "
                             "torch_dist checkpoint has the same tensors")
        out[key] = np.stack([layers[i] for i in range(num_layers)])
    return out


def extra_state_keys(num_layers: int) -> List[str]:
    """The keys of the Transformer Engine _extra_state objects of a GPT with `num_layers` layers."""
    return [f"{STACKED}{module}._extra_state/shard_{layer}_{num_layers}"
            for module in TE_EXTRA_STATE_MODULES for layer in range(num_layers)]
