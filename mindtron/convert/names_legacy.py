"""Megatron's legacy GPT state dicts and the canonical names.

A legacy checkpoint's `model` entry is nested the way GPTModel.state_dict_for_save_checkpoint builds it:

    {"language_model": {"embedding": {"word_embeddings": {"weight": T}, "position_embeddings": {"weight": T}},
                        "encoder": {"layers.0.input_norm.weight": T, ..., "final_norm.weight": T},
                        "output_layer": {"weight": T}},                      (untied, last stage)
     "word_embeddings_for_head": {"weight": T}}                              (tied, last stage, pp > 1)

Older checkpoints call the encoder `transformer`, the self-attention block `attention`, and the norms
`input_layernorm`, `post_attention_layernorm` and `final_layernorm`; all spellings map to one canonical name.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

from mindtron.convert import names as N

_RENAMES = [
    (re.compile(r"^language_model\.transformer\."), "language_model.encoder."),
    (re.compile(r"\.attention\."), ".self_attention."),
    (re.compile(r"\.input_layernorm\."), ".input_norm."),
    (re.compile(r"\.post_attention_layernorm\."), ".post_attention_norm."),
    (re.compile(r"\.final_layernorm\."), ".final_norm."),
]
_ENCODER = "language_model.encoder."


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as one dict with dotted keys ({'a': {'b': x}} -> {'a.b': x})."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def canonical_name(key: str) -> Optional[str]:
    """The canonical (stage-local) name of a flattened legacy key, or None when it has none."""
    name = key
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name if N.is_canonical(name) else None


def is_legacy_state(model: Mapping[str, Any]) -> bool:
    """Whether a model state dict has the legacy structure."""
    return any(str(k).startswith(("language_model", "word_embeddings_for_head")) for k in model)


def legacy_state(stage: Mapping[str, Any]) -> Dict[str, Any]:
    """One stage's tensors (canonical, stage-local names) nested as Megatron's legacy GPTModel saves them."""
    language_model: Dict[str, Any] = {}
    embedding: Dict[str, Any] = {}
    encoder: Dict[str, Any] = {}
    model: Dict[str, Any] = {}
    for name, tensor in stage.items():
        if name == N.WORD:
            embedding["word_embeddings"] = {"weight": tensor}
        elif name == N.POSITION:
            embedding["position_embeddings"] = {"weight": tensor}
        elif name == N.OUTPUT:
            language_model["output_layer"] = {"weight": tensor}
        elif name == N.HEAD_COPY:
            model["word_embeddings_for_head"] = {"weight": tensor}
        elif name.startswith(_ENCODER) and not re.search(r"\.(attn|ffn)_post_norm\.", name):
            encoder[name[len(_ENCODER):]] = tensor
        else:
            raise ValueError(f"{name} has no place in Megatron's legacy GPT (sandwich norms are mindtron's own); "
                             "this model cannot be written as a Megatron checkpoint")
    if embedding:
        language_model["embedding"] = embedding
    language_model["encoder"] = encoder
    language_model = {k: language_model[k] for k in ("embedding", "encoder", "output_layer") if k in language_model}
    return {"language_model": language_model, **model}
