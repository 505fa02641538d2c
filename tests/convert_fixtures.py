"""Megatron-LM checkpoints for the converter tests, laid out from Megatron's documented formats by code written
here (independent of mindtron.convert): whole-model weights by Megatron's legacy names, split over tensor and
pipeline ranks, named as the legacy model (new or old spellings, checkpoint versions 0-3) or Megatron-Core
(local or Transformer Engine layers), and saved with torch.save or with the byte-level writer in
convert_bytes.py."""
from __future__ import annotations

import argparse
import contextlib
import enum
import io
import random
import signal
import sys
import types
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from model_configs import make_config

LAYER = "language_model.encoder.layers."


def config(name: str, **overrides):
    """A tiny model config from tests/model_configs.py, compiled-layer free (faster single forwards)."""
    import dataclasses
    from mindtron.legacy_model import TransformerConfig
    if "jit_layers" in {f.name for f in dataclasses.fields(TransformerConfig)}:
        overrides.setdefault("jit_layers", False)
    return make_config(name, **overrides)


def random_weights(cfg, seed: int = 0) -> Dict[str, np.ndarray]:
    """Every parameter of the whole model (GPTModel's names), random including norms, as float32."""
    from mindtron.legacy_model import GPTModel
    from mindtron.parallel_core import parallel_state as ps

    owned = not ps.model_parallel_is_initialized()
    if owned:
        ps.initialize_model_parallel()
    try:
        names = {n: tuple(p.shape) for n, p in GPTModel(cfg).parameters_and_names()}
    finally:
        if owned:
            ps.destroy_model_parallel()
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(names.items()):
        base = 1.0 if name.endswith("norm.weight") else 0.0
        out[name] = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------------
# Splitting as Megatron's layers do
# --------------------------------------------------------------------------------------------------------
def _tp_pieces(name: str, array: np.ndarray, tp: int, swiglu: bool):
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "query_key_value.weight",
                      "query_key_value.bias")):
        return np.split(array, tp, 0)
    if ".dense_h_to_4h." in name:
        if not swiglu:
            return np.split(array, tp, 0)
        gate, up = np.split(array, 2, 0)
        return [np.concatenate([g, u]) for g, u in zip(np.split(gate, tp), np.split(up, tp))]
    if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return np.split(array, tp, 1)
    return [array] * tp


def _old_qkv_order(shard: np.ndarray, version: int, heads_per_rank: int, head_dim: int) -> np.ndarray:
    """A version-2 shard ([np_l, 3, hn] rows) in version 0 ([3, np_l, hn]) or version 1 ([np_l, hn, 3]) order."""
    rest = shard.shape[1:]
    grouped = shard.reshape((heads_per_rank, 3, head_dim) + rest)
    axes = (1, 0, 2) if version == 0 else (0, 2, 1)
    return np.ascontiguousarray(grouped.transpose(axes + tuple(range(3, grouped.ndim)))).reshape(shard.shape)


def megatron_shards(cfg, weights: Dict[str, np.ndarray], tp: int, pp: int,
                    version: int = 3) -> Dict[Tuple[int, int], Dict[str, np.ndarray]]:
    """(tensor rank, pipeline rank) -> that rank's tensors by legacy name, layers numbered per stage."""
    per_stage = cfg.num_layers // pp
    swiglu = cfg.hidden_act == "swiglu"
    out = {(t, p): {} for t in range(tp) for p in range(pp)}
    for name, array in weights.items():
        if name.startswith(LAYER):
            index, rest = name[len(LAYER):].split(".", 1)
            stage, local = divmod(int(index), per_stage)
            stages = [(stage, f"{LAYER}{local}.{rest}")]
        elif "embedding" in name:
            stages = [(0, name)]
            if name.endswith("word_embeddings.weight") and pp > 1 and not cfg.untie_embeddings_and_output_weights:
                stages.append((pp - 1, "word_embeddings_for_head.weight"))
        else:
            stages = [(pp - 1, name)]
        for stage, local in stages:
            for t, piece in enumerate(_tp_pieces(name, array, tp, swiglu)):
                if "query_key_value" in name and version < 2:
                    piece = _old_qkv_order(piece, version, cfg.num_attention_heads // tp, cfg.kv_channels)
                out[(t, stage)][local] = np.ascontiguousarray(piece)
    return out


# --------------------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------------------
def legacy_model_state(tensors: Dict[str, np.ndarray], old_names: bool = False) -> dict:
    """The nested dict Megatron's legacy GPTModel.state_dict_for_save_checkpoint returns."""
    lm, embedding, encoder, top = {}, {}, {}, {}
    for name, array in tensors.items():
        if name == "word_embeddings_for_head.weight":
            top["word_embeddings_for_head"] = {"weight": array}
        elif name.startswith("language_model.embedding."):
            table = name.split(".")[2]
            embedding[table] = {"weight": array}
        elif name.startswith("language_model.encoder."):
            key = name[len("language_model.encoder."):]
            if old_names:
                key = (key.replace("input_norm", "input_layernorm").replace("post_attention_norm",
                                                                               "post_attention_layernorm")
                       .replace("final_norm", "final_layernorm").replace("self_attention.", "attention."))
            encoder[key] = array
        elif name == "language_model.output_layer.weight":
            lm["output_layer"] = {"weight": array}
        else:
            raise KeyError(name)
    if embedding:
        lm["embedding"] = embedding
    lm["transformer" if old_names else "encoder"] = encoder
    return {"language_model": lm, **top}


_CORE = [("input_norm.", "self_attention.linear_qkv.layer_norm_", "input_layernorm."),
         ("self_attention.query_key_value.", "self_attention.linear_qkv.", None),
         ("self_attention.dense.", "self_attention.linear_proj.", None),
         ("post_attention_norm.", "mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
         ("mlp.dense_h_to_4h.", "mlp.linear_fc1.", None),
         ("mlp.dense_4h_to_h.", "mlp.linear_fc2.", None)]


def core_model_state(tensors: Dict[str, np.ndarray], transformer_engine: bool = True,
                     extra_state=lambda: io.BytesIO(b"fp8-meta")) -> dict:
    """Megatron-Core's flat state dict (Transformer Engine's fused norm names, or the local layers')."""
    out = {}
    for name, array in tensors.items():
        if name == "language_model.embedding.word_embeddings.weight":
            out["embedding.word_embeddings.weight"] = array
        elif name == "language_model.embedding.position_embeddings.weight":
            out["embedding.position_embeddings.weight"] = array
        elif name in ("language_model.output_layer.weight", "word_embeddings_for_head.weight"):
            out["output_layer.weight"] = array
        elif name.startswith("language_model.encoder.final_norm."):
            out["decoder.final_layernorm." + name.rsplit(".", 1)[1]] = array
        else:
            index, rest = name[len(LAYER):].split(".", 1)
            for legacy, te, local in _CORE:
                if rest.startswith(legacy):
                    new = (te if transformer_engine or local is None else local) + rest[len(legacy):]
                    out[f"decoder.layers.{index}.{new}"] = array
                    break
            else:
                raise KeyError(name)
    if transformer_engine:
        layers = sorted({k.split(".")[2] for k in out if k.startswith("decoder.layers.")})
        for index in layers:
            for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                           "mlp.linear_fc2", "self_attention.core_attention"):
                out[f"decoder.layers.{index}.{module}._extra_state"] = extra_state()
    return out


def megatron_args(cfg, tp: int, pp: int, **extra) -> dict:
    """The argument namespace Megatron-LM stores (the fields the converter and Megatron's checks read)."""
    args = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=cfg.group_query_attention,
        num_query_groups=cfg.num_query_groups if cfg.group_query_attention else 1, kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=cfg.seq_length,
        encoder_seq_length=cfg.seq_length, padded_vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=64,
        position_embedding_type=cfg.position_embedding_type, add_position_embedding=True,
        rotary_base=int(cfg.rotary_base), rotary_percent=cfg.rotary_percent, normalization=cfg.normalization,
        norm_epsilon=cfg.norm_epsilon, swiglu=cfg.hidden_act == "swiglu", squared_relu=False, openai_gelu=False,
        bias_gelu_fusion=True, add_bias_linear=cfg.add_bias_linear, add_qkv_bias=False,
        untie_embeddings_and_output_weights=cfg.untie_embeddings_and_output_weights,
        apply_query_key_layer_scaling=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        tokenizer_type="GPT2BPETokenizer", consumed_train_samples=640, iteration=20, lr=3e-4,
        transformer_impl="transformer_engine", num_experts=None)
    args.update(extra)
    return args


@contextlib.contextmanager
def megatron_enum_modules():
    """Megatron-Core's enum classes under their real module names (megatron.core.enums,
    megatron.core.transformer.enums), so that torch.save pickles them as Megatron's checkpoints do (by
    reference: the reader sees only the names). They are removed again afterwards: no reader can import them."""
    made = {}
    for name in ("megatron", "megatron.core", "megatron.core.transformer"):
        made[name] = types.ModuleType(name)
    core_enums = made["megatron.core.enums"] = types.ModuleType("megatron.core.enums")
    transformer_enums = made["megatron.core.transformer.enums"] = types.ModuleType("megatron.core.transformer.enums")
    definitions = [(core_enums, "ModelType", enum.Enum, {"encoder_or_decoder": 1}),
                   (core_enums, "Fp8Recipe", (str, enum.Enum), {"delayed": "delayed", "mxfp8": "mxfp8"}),
                   (transformer_enums, "AttnBackend", enum.Enum, {"flash": 1, "fused": 2, "unfused": 3, "local": 4,
                                                                  "auto": 5}),
                   (transformer_enums, "CudaGraphModule", enum.Enum, {"attn": 1, "mlp": 2, "moe": 3}),
                   (transformer_enums, "InferenceCudaGraphScope", enum.Enum, {"none": 1, "layer": 2, "block": 3})]
    found = types.SimpleNamespace()
    for module, name, base, members in definitions:
        bases = base if isinstance(base, tuple) else (base,)
        cls = enum.Enum(name, members, module=module.__name__, type=bases[0] if len(bases) > 1 else None)
        setattr(module, name, cls)
        setattr(found, name, cls)
    saved = {name: sys.modules.get(name) for name in made}
    sys.modules.update(made)
    try:
        yield found
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def megatron_core_args(cfg, tp: int, pp: int, enums, **extra) -> dict:
    """The arguments a current Megatron-Core (0.19) run stores: megatron_args plus the enum-valued ones."""
    args = megatron_args(cfg, tp, pp, **extra)
    args.update(exit_signal=signal.SIGTERM, exit_signal_handler=False, model_type=enums.ModelType.encoder_or_decoder,
                attention_backend=enums.AttnBackend.auto, cuda_graph_modules=[enums.CudaGraphModule.attn],
                inference_cuda_graph_scope=enums.InferenceCudaGraphScope.none, fp8_recipe=enums.Fp8Recipe.delayed,
                use_mcore_models=True, use_legacy_models=False)
    return args


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


# --------------------------------------------------------------------------------------------------------
# Mixture of Experts, as Megatron-Core lays it out
# --------------------------------------------------------------------------------------------------------
MOE_MODELS = {
    # Mixtral-like: every layer MoE, softmax top-2, SwiGLU experts, no biases
    "mixtral": ("llama", dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24)),
    # DeepSeek-like: first layer dense, sigmoid scores with an expert bias, a gated shared expert
    "deepseek": ("llama", dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_layer_freq=[0, 1],
                               moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                               moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True)),
    # GPT-2 style: LayerNorm, GeLU, biases in the router and the experts, every other layer MoE
    "gpt2_moe": ("gpt2", dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, moe_layer_freq=2)),
}
MOE_PARTS = (".mlp.router.", ".mlp.experts.", ".mlp.shared_experts.")


def moe_config(name: str, **overrides):
    """A tiny MoE model config (MOE_MODELS) with compiled-layer free layers."""
    from mindtron.parallel_core.moe import MoEConfig
    base, moe = MOE_MODELS[name]
    return config(base, moe_config=MoEConfig(**moe), **overrides)


def _glu_split(array: np.ndarray, parts: int, axis: int, swiglu: bool):
    """Column-parallel rows split over `parts` ranks; with SwiGLU each rank holds its [gate_r; up_r]."""
    if not swiglu:
        return np.split(array, parts, axis)
    gate, up = np.split(array, 2, axis)
    return [np.concatenate([g, u], axis) for g, u in zip(np.split(gate, parts, axis), np.split(up, parts, axis))]


def megatron_moe_models(cfg, weights: Dict[str, np.ndarray], tp: int, pp: int, ep: int, etp: int = None,
                        experts: str = "sequential") -> Dict[Tuple[int, int, int], dict]:
    """(tensor rank, pipeline rank, expert rank) -> Megatron-Core model state dict of that rank's file (Transformer
    Engine names). Dense weights are repeated in every expert rank's file; expert rank r holds global experts
    r x E/ep ... as local experts 0.., each split over the expert tensor-parallel ranks (file of tensor rank t:
    shard t % etp). `experts`: "sequential" (local_experts.I.linear_fcK), "grouped" (legacy GroupedMLP weight1/
    weight2) or "te_grouped" (TEGroupedMLP linear_fcK.weightI)."""
    etp = tp if etp is None else etp
    moe = cfg.moe_config
    swiglu = cfg.hidden_act == "swiglu"
    per_stage, local_experts = cfg.num_layers // pp, moe.num_experts // ep
    dense = {k: v for k, v in weights.items() if not any(part in k for part in MOE_PARTS)}
    dense_models = {k: core_model_state(v) for k, v in megatron_shards(cfg, dense, tp, pp).items()}
    out = {}
    for (t, p), base in dense_models.items():
        for e in range(ep):
            model = dict(base)
            for local in range(per_stage):
                layer = p * per_stage + local
                if not moe.is_moe_layer(layer, cfg.num_layers):
                    continue
                prefix, source = f"decoder.layers.{local}.", f"{LAYER}{layer}.mlp."
                # an MoE layer's norm is its own module (Transformer Engine fuses it into no linear layer)
                for part in ("weight", "bias"):
                    if f"{prefix}mlp.linear_fc1.layer_norm_{part}" in model:
                        norm = model.pop(f"{prefix}mlp.linear_fc1.layer_norm_{part}")
                        model[f"{prefix}pre_mlp_layernorm.{part}"] = norm
                for module in ("mlp.linear_fc1", "mlp.linear_fc2"):
                    model.pop(f"{prefix}{module}._extra_state")
                for part in ("weight", "bias", "expert_bias"):
                    if source + f"router.{part}" in weights:
                        model[f"{prefix}mlp.router.{part}"] = weights[source + f"router.{part}"]
                if source + "shared_experts.dense_h_to_4h.weight" in weights:
                    fc1 = _glu_split(weights[source + "shared_experts.dense_h_to_4h.weight"], tp, 0, swiglu)[t]
                    fc2 = np.split(weights[source + "shared_experts.dense_4h_to_h.weight"], tp, 1)[t]
                    model[f"{prefix}mlp.shared_experts.linear_fc1.weight"] = np.ascontiguousarray(fc1)
                    model[f"{prefix}mlp.shared_experts.linear_fc2.weight"] = np.ascontiguousarray(fc2)
                    for module in ("linear_fc1", "linear_fc2"):
                        model[f"{prefix}mlp.shared_experts.{module}._extra_state"] = io.BytesIO(b"fp8-meta")
                    if source + "shared_experts.gate_weight" in weights:
                        gate = weights[source + "shared_experts.gate_weight"]
                        model[f"{prefix}mlp.shared_experts.gate_weight"] = gate
                mine = range(e * local_experts, (e + 1) * local_experts)
                shard = t % etp
                fc1 = [_glu_split(weights[source + "experts.dense_h_to_4h.weight"][g], etp, 0, swiglu)[shard]
                       for g in mine]
                fc2 = [np.split(weights[source + "experts.dense_4h_to_h.weight"][g], etp, 1)[shard] for g in mine]
                b1 = [_glu_split(weights[source + "experts.dense_h_to_4h.bias"][g], etp, 0, swiglu)[shard] for g in mine
                      ] if source + "experts.dense_h_to_4h.bias" in weights else None
                b2 = [weights[source + "experts.dense_4h_to_h.bias"][g] for g in mine] \
                    if source + "experts.dense_4h_to_h.bias" in weights else None
                if experts == "grouped":  # GroupedMLP's buffers, viewed per expert as [h, ffn] and [ffn, h]
                    assert b1 is None, "GroupedMLP has no biases"
                    h = cfg.hidden_size
                    model[f"{prefix}mlp.experts.weight1"] = np.stack([w.T for w in fc1]).reshape(h, -1)
                    model[f"{prefix}mlp.experts.weight2"] = np.stack([w.T for w in fc2]).reshape(-1, h)
                for i in range(local_experts):
                    pieces = {"linear_fc1.weight": fc1[i], "linear_fc2.weight": fc2[i]}
                    if b1 is not None:
                        pieces.update({"linear_fc1.bias": b1[i], "linear_fc2.bias": b2[i]})
                    for key, value in pieces.items():
                        module, part = key.split(".")
                        if experts == "sequential":
                            model[f"{prefix}mlp.experts.local_experts.{i}.{key}"] = np.ascontiguousarray(value)
                            model[f"{prefix}mlp.experts.local_experts.{i}.{module}._extra_state"] = io.BytesIO(b"m")
                        elif experts == "te_grouped":
                            model[f"{prefix}mlp.experts.{module}.{part}{i}"] = np.ascontiguousarray(value)
                if experts == "te_grouped":
                    for module in ("linear_fc1", "linear_fc2"):
                        model[f"{prefix}mlp.experts.{module}._extra_state"] = io.BytesIO(b"fp8-meta")
            out[(t, p, e)] = model
    return out


def megatron_moe_args(cfg, tp: int, pp: int, ep: int, etp: int = None, experts: str = "sequential", **extra) -> dict:
    """megatron_args of an MoE run: Megatron's MoE arguments (lists where Megatron's parser makes them) and the
    expert layout."""
    moe = cfg.moe_config
    args = megatron_args(cfg, tp, pp, num_experts=moe.num_experts, moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
                         moe_router_topk=moe.moe_router_topk, moe_layer_freq=moe.moe_layer_freq,
                         moe_router_score_function=moe.moe_router_score_function,
                         moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
                         moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
                         moe_shared_expert_gate=moe.moe_shared_expert_gate,
                         moe_router_load_balancing_type=["aux_loss"], moe_aux_loss_coeff=[0.01],
                         moe_token_dispatcher_type="alltoall", moe_grouped_gemm=experts != "sequential",
                         moe_use_legacy_grouped_gemm=experts == "grouped", expert_model_parallel_size=ep,
                         expert_tensor_parallel_size=tp if etp is None else etp, sequence_parallel=tp > 1)
    args.update(extra)
    return args


# --------------------------------------------------------------------------------------------------------
# Saving with torch.save (PyTorch is a test-only dependency)
# --------------------------------------------------------------------------------------------------------
def save_with_torch(root: Path, models: Dict[Tuple[int, int], dict], args: dict, iteration: int = 20,
                    version=3.0, release: bool = False, dtype: str = "float32", extras: bool = True) -> Path:
    """Write one model_optim_rng.pt per rank ((tensor, pipeline[, expert]) rank -> model) with torch.save, as
    Megatron's save_checkpoint does."""
    import torch

    torch_dtype = getattr(torch, dtype)

    def to_torch(obj):
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj).to(torch_dtype) if obj.dtype == np.float32 else torch.from_numpy(obj)
        if isinstance(obj, dict):
            return {k: to_torch(v) for k, v in obj.items()}
        return obj

    pp = 1 + max(k[1] for k in models)
    directory = root / ("release" if release else f"iter_{iteration:07d}")
    namespace = argparse.Namespace(**args, params_dtype=torch_dtype)
    ep = 1 + max(k[2] if len(k) > 2 else 0 for k in models)
    for key, model in models.items():
        t, p = key[:2]
        state = {"args": namespace, "iteration": iteration, "model": to_torch(model)}
        if version:  # version 0 checkpoints predate the field
            state["checkpoint_version"] = version
        if extras:  # what Megatron also saves: optimizer, scheduler and RNG states (not converted)
            state["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
            state["opt_param_scheduler"] = {"num_steps": 640}
            state["rng_state"] = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                   "torch_rng_state": torch.get_rng_state()}]
        path = directory / rank_dir(t, p, pp, key[2] if len(key) > 2 else 0, ep) / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if release else str(iteration))
    return directory


def build_checkpoint(root: Path, name: str, tp: int, pp: int, scheme: str = "legacy", version: float = 3.0,
                     seed: int = 0, old_names: bool = False, transformer_engine: bool = True, **save_kwargs):
    """(config, whole-model weights, checkpoint directory) of a torch.save'd Megatron checkpoint."""
    cfg = config(name)
    weights = random_weights(cfg, seed)
    shards = megatron_shards(cfg, weights, tp, pp, int(version) if version is not None else 0)
    if scheme == "legacy":
        models = {k: legacy_model_state(v, old_names) for k, v in shards.items()}
    else:
        models = {k: core_model_state(v, transformer_engine) for k, v in shards.items()}
    save_with_torch(root, models, megatron_args(cfg, tp, pp), version=version, **save_kwargs)
    return cfg, weights, root
