"""The `moe_config` YAML section of documents 000/001 (MindFormers' names) -> Megatron's MoE flags.

    moe_config:
      expert_num: 8              # --num-experts
      num_experts_chosen: 2      # --moe-router-topk
      capacity_factor: 1.1       # --moe-expert-capacity-factor (a negative value: dropless)
      aux_loss_factor: 0.01      # --moe-aux-loss-coeff
      use_gmm: true              # --moe-grouped-gemm
      ...

Every key of MindFormers' MoEConfig is known here: it maps onto a flag, is accepted without effect (with the
reason: options of MindFormers' static-graph implementation that change nothing in the maths), or is refused
(with the reason). Megatron's own dest names (moe_router_topk, ...) are accepted in the section too.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

__all__ = ["moe_section_to_flags", "MOE_YAML_KEYS", "MOE_YAML_NO_EFFECT"]

_Rule = Callable[[Any, Dict[str, Any]], List[Tuple[str, Any]]]


def _to(dest: str, convert: Callable[[Any], Any] = lambda v: v) -> _Rule:
    return lambda value, section: [(dest, convert(value))]


def _capacity(value, section):
    # MindFormers writes dropless as a negative factor
    return [("moe_expert_capacity_factor", None if value is None or float(value) < 0 else float(value))]


def _norm_topk_prob(value, section):
    if section.get("use_gating_sigmoid"):
        if not value:
            raise ValueError("norm_topk_prob: false with use_gating_sigmoid has no Megatron counterpart (sigmoid "
                             "weights of top-k > 1 are always normalised)")
        return []
    return [("moe_router_pre_softmax", not bool(value))]  # softmax over all experts = weights not renormalised


def _sdrop(value, section):
    # MindFormers' documentation: enable_sdrop matches Megatron's position drop policy with padding to capacity
    return [("moe_token_drop_policy", "position"), ("moe_pad_expert_input_to_capacity", True)] if value else []


def _router_dtype(value, section):
    dtypes = {"float32": "fp32", "fp32": "fp32", "float64": "fp64", "fp64": "fp64"}
    if str(value) not in dtypes:
        raise ValueError(f"router_dense_type {value!r}: use float32 or float64 (--moe-router-dtype)")
    return [("moe_router_dtype", dtypes[str(value)])]


def _topk_method(value, section):
    if value not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {value!r}: use greedy or group_limited_greedy")
    if value == "greedy" and (section.get("n_group") or section.get("topk_group")):
        raise ValueError("n_group / topk_group need topk_method: group_limited_greedy")
    return []


def _shared_experts(value, section):
    if not value:
        return []
    width = section.get("moe_intermediate_size")
    if width is None:
        raise ValueError("shared_expert_num needs moe_intermediate_size (the shared expert is shared_expert_num "
                         "experts wide)")
    return [("moe_shared_expert_intermediate_size", int(value) * int(width))]


def _aux_types(value, section):
    names = {"expert": "aux_loss"}
    types = [value] if isinstance(value, str) else list(value or [])
    bad = [t for t in types if t not in names]
    if bad:
        raise ValueError(f"aux_loss_types {bad}: only 'expert' (Megatron's aux_loss) has a Megatron counterpart")
    return [("moe_router_load_balancing_type", [names[t] for t in types])] if types else []


def _routing_policy(value, section):
    if value not in ("TopkRouterV1", "TopkRouterV2"):
        raise ValueError(f"routing_policy {value!r}: use TopkRouterV1 or TopkRouterV2 (the same top-k routing)")
    return []


def _zero_is_unset(dest: str) -> _Rule:
    return lambda value, section: [(dest, None if not value else float(value))]


def _first_k_dense(value, section):
    if isinstance(value, bool):
        raise ValueError(f"first_k_dense_replace must be a number of layers, got {value!r}")
    return [("first_k_dense_replace", int(value))]


MOE_YAML_KEYS: Dict[str, _Rule] = {
    "expert_num": _to("num_experts", int),
    "num_experts_chosen": _to("moe_router_topk", int),
    "capacity_factor": _capacity,
    "aux_loss_factor": _to("moe_aux_loss_coeff", lambda v: [float(v)]),
    "z_loss_factor": _zero_is_unset("moe_z_loss_coeff"),
    "routing_policy": _routing_policy,
    "norm_topk_prob": _norm_topk_prob,
    "enable_sdrop": _sdrop,
    "router_dense_type": _router_dtype,
    "shared_expert_num": _shared_experts,
    "use_shared_expert_gating": _to("moe_shared_expert_gate", bool),
    "topk_method": _topk_method,
    "topk_group": _to("moe_router_group_topk", int),
    "n_group": _to("moe_router_num_groups", int),
    "first_k_dense_replace": _first_k_dense,
    "moe_intermediate_size": _to("moe_ffn_hidden_size", int),
    "routed_scaling_factor": lambda v, s: [("moe_router_topk_scaling_factor", None if float(v) == 1.0 else float(v))],
    "aux_loss_types": _aux_types,
    "aux_loss_factors": _to("moe_aux_loss_coeff", lambda v: [float(x) for x in (v if isinstance(v, list) else [v])]),
    "balance_via_topk_bias": _to("moe_router_enable_expert_bias", bool),
    "topk_bias_update_rate": _to("moe_router_bias_update_rate", float),
    "use_allgather_dispatcher": lambda v, s: [("moe_token_dispatcher_type", "allgather" if v else "alltoall")],
    "moe_shared_expert_overlap": _to("moe_shared_expert_overlap", bool),
    "expert_model_parallel": _to("expert_model_parallel_size", int),
    "use_gating_sigmoid": lambda v, s: [("moe_router_score_function", "sigmoid")] if v else [],
    "use_gmm": _to("moe_grouped_gemm", bool),
    "enable_gmm_safe_tokens": _to("enable_gmm_safe_tokens", bool),
    "use_fused_ops_permute": _to("moe_permute_fusion", bool),
    "use_fused_ops_topkrouter": _to("moe_router_fusion", bool),
    # the MoE tools (documents 000/001)
    "save_token_distribution": _to("save_token_distribution", bool),
    "callback_moe_droprate": _to("callback_moe_droprate", bool),
    "enable_cold_hot_expert": _to("enable_cold_hot_expert", bool),
    "hot_expert_num": _to("hot_expert_num", int),
    "cold_token_percent": _to("cold_token_percent", float),
    "moe_module_name": _to("moe_module_name", str),
    "update_step": _to("hot_expert_update_step", int),
}

MOE_YAML_NO_EFFECT: Dict[str, str] = {
    "expert_group_size": "MindFormers' static-graph dispatch grouping; routing and results are the same",
    "group_wise_a2a": "MindFormers' static-graph all-to-all variant; the same tokens reach the same experts",
    "comp_comm_parallel": "MindFormers' compute/communication overlap; the same results",
    "comp_comm_parallel_degree": "MindFormers' compute/communication overlap; the same results",
    "cur_layer": "set per layer by MindFormers' model code; mindtron numbers layers itself",
    "max_router_load": "a buffer size of MindFormers' fused router kernel",
    "enable_deredundency": "an Ascend all-to-all de-duplication; the same results",
    "npu_nums_per_device": "an Ascend all-to-all de-duplication setting",
}


def moe_section_to_flags(section: Dict[str, Any], is_flag: Callable[[str], bool]) -> Tuple[List[Tuple[str, Any]],
                                                                                          List[str]]:
    """([(dest, value)], [unknown keys]) for a moe_config mapping; `is_flag(name)` says whether a key is
    already a flag's dest (Megatron spellings are accepted as they are)."""
    out: List[Tuple[str, Any]] = []
    unknown: List[str] = []
    for key, value in section.items():
        key = str(key).replace("-", "_")
        if value is None or key in MOE_YAML_NO_EFFECT:
            continue
        if key in MOE_YAML_KEYS:
            out += MOE_YAML_KEYS[key](value, section)
        elif is_flag(key):
            out.append((key, value))
        else:
            unknown.append(key)
    return out, unknown
