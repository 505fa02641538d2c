"""The Mixture-of-Experts settings (Megatron-Core's MoE fields of TransformerConfig, as one dataclass).

Field names are Megatron's argument names, so a flag `--moe-router-topk` lands in `moe_router_topk`.
`validate()` checks what needs only this config and the model's sizes; `validate_parallel()` what needs
the parallel sizes. Both run before any process group exists and name the flag to change.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
DISPATCHERS = ("allgather", "alltoall")
DROP_POLICIES = ("probs", "position")


def parse_moe_layer_freq(value: Union[int, str, Sequence[int]]) -> Union[int, List[int]]:
    """Megatron's `--moe-layer-freq`: an int N (every N-th layer from layer 0 is MoE) or a list expression
    such as "([0]+[1]*23)" of 0 (dense) / 1 (MoE) per layer."""
    if isinstance(value, bool):
        raise ValueError(f"--moe-layer-freq must be an int or a list of 0/1, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = _eval_list_expression(text)
        except (ValueError, SyntaxError, TypeError) as err:
            raise ValueError(f"--moe-layer-freq {value!r} is neither an int nor a list expression like "
                             f"'([0]+[1]*23)': {err}") from None
    pattern = [int(v) for v in value]
    if any(v not in (0, 1) for v in pattern):
        raise ValueError(f"--moe-layer-freq list must hold only 0 (dense) and 1 (MoE), got {pattern}")
    return pattern


def _eval_list_expression(text: str) -> list:
    """Evaluate list arithmetic (+ and * on lists of ints, parentheses) without eval()."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.List):
            return [walk(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)[:40]}")
    result = walk(ast.parse(text, mode="eval"))
    if not isinstance(result, list):
        raise ValueError("the expression does not give a list")
    return result


@dataclass
class MoEConfig:
    """Mixture-of-Experts options (Megatron-Core semantics; document 000/001's `moe_config` maps here)."""

    num_experts: Optional[int] = None
    """Routed experts per MoE layer; None means a dense model (--num-experts; moe_config.expert_num)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Inner width of each expert (--moe-ffn-hidden-size); defaults to the model's ffn_hidden_size."""
    moe_layer_freq: Union[int, List[int]] = 1
    """Which layers are MoE (--moe-layer-freq): int N = every N-th layer starting at layer 0, or a 0/1 list
    per layer such as "([0]+[1]*23)" (first layer dense, as DeepSeek's first_k_dense_replace)."""
    first_k_dense_replace: Optional[int] = None
    """The first k layers dense, the rest MoE: sets moe_layer_freq to [0] * k + [1] * (layers - k)
    (DeepSeek's and document 000's moe_config.first_k_dense_replace; --first-k-dense-replace)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (--moe-router-topk; moe_config.num_experts_chosen)."""
    moe_router_score_function: str = "softmax"
    """"softmax", "sigmoid" or "sqrtsoftplus": how logits become scores (--moe-router-score-function)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k, instead of over the k chosen logits
    (--moe-router-pre-softmax); required for top-1 with softmax."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiply the chosen experts' weights by this (--moe-router-topk-scaling-factor)."""
    moe_router_num_groups: Optional[int] = None
    """Expert groups for group-limited routing (--moe-router-num-groups; DeepSeek's n_group)."""
    moe_router_group_topk: Optional[int] = None
    """Groups each token may use (--moe-router-group-topk; DeepSeek's topk_group)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for the top-k choice only, moved by
    sign(mean load - load) x rate after every step (--moe-router-enable-expert-bias)."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update (--moe-router-bias-update-rate)."""
    moe_router_dtype: Optional[str] = None
    """Router logits dtype: None (the input's), "fp32" or "fp64" (--moe-router-dtype)."""
    moe_router_force_load_balancing: bool = False
    """Replace the router logits by random ones (benchmarking only) (--moe-router-force-load-balancing)."""
    moe_input_jitter_eps: Optional[float] = None
    """Multiply the router input by U(1 - eps, 1 + eps) noise in training (--moe-input-jitter-eps)."""
    moe_router_load_balancing_type: Union[str, List[str]] = "aux_loss"
    """"aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none", or a list of aux-loss types
    (--moe-router-load-balancing-type)."""
    moe_aux_loss_coeff: Union[float, List[float]] = 0.0
    """Coefficient of the load-balancing loss, one per type when a list (--moe-aux-loss-coeff;
    moe_config.aux_loss_factor)."""
    moe_z_loss_coeff: Optional[float] = None
    """Coefficient of the router z-loss, mean(logsumexp(logits)^2) (--moe-z-loss-coeff)."""
    moe_expert_capacity_factor: Optional[float] = None
    """Capacity per expert = ceil(tokens x topk / experts x factor); None is dropless
    (--moe-expert-capacity-factor; moe_config.capacity_factor)."""
    moe_token_drop_policy: str = "probs"
    """Which routed tokens an over-full expert keeps: highest weight ("probs") or earliest ("position")
    (--moe-token-drop-policy)."""
    moe_pad_expert_input_to_capacity: bool = False
    """Pad every expert to exactly its capacity with weight-0 rows (--moe-pad-expert-input-to-capacity)."""
    moe_token_dispatcher_type: str = "allgather"
    """How tokens reach their experts' ranks: "allgather" or "alltoall" (--moe-token-dispatcher-type)."""
    moe_grouped_gemm: bool = False
    """All local experts in one grouped matmul instead of a loop (--moe-grouped-gemm; moe_config.use_gmm):
    MindSpore's grouped-matmul kernel where the device has it, padded batched matmuls elsewhere."""
    enable_gmm_safe_tokens: bool = False
    """Give the grouped matmul at least one (weight-0) row per expert, so an expert without tokens never
    reaches the kernel with an empty input (document 001's moe_config.enable_gmm_safe_tokens)."""
    moe_apply_probs_on_input: bool = False
    """Scale the expert input by its routing weight instead of the activation (top-1 only)
    (--moe-apply-probs-on-input)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert that every token also goes through (--moe-shared-expert-intermediate-size)."""
    moe_shared_expert_overlap: bool = False
    """Overlap the shared expert with the dispatch (--moe-shared-expert-overlap); accepted, computed in order."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x . gate_weight) (--moe-shared-expert-gate)."""
    moe_layer_recompute: bool = False
    """Recompute each MoE layer in the backward pass instead of keeping its activations
    (--moe-layer-recompute)."""
    moe_per_layer_logging: bool = False
    """Log every MoE layer's auxiliary losses, not only their mean (--moe-per-layer-logging)."""
    moe_router_force_biased: Optional[float] = None
    """Benchmarking only: random router logits plus a random per-expert bias N(0, |std|) that every rank
    draws alike, anew at each forward (std > 0) or once per layer (std < 0), so a few experts get most
    tokens (--moe-router-force-biased)."""

    # --- documents 000/001: MoE tools (mindtron's flags, named after MindFormers' moe_config keys) ---------
    save_token_distribution: bool = False
    """Save the tokens routed to each expert, per MoE layer and iteration, as .npy files under
    training_config.token_distribution_dir (--save-token-distribution; moe_config.save_token_distribution)."""
    callback_moe_droprate: bool = False
    """Print each MoE layer's share of routed pairs dropped by the capacity limit every log interval
    (adds a MoEDropRateCallback; --callback-moe-droprate; moe_config.callback_moe_droprate)."""
    enable_cold_hot_expert: bool = False
    """Replicate the hot_expert_num most loaded experts of each MoE layer on every expert-parallel rank; their
    tokens skip the all-to-all (--enable-cold-hot-expert; moe_config.enable_cold_hot_expert)."""
    hot_expert_num: int = 0
    """Hot (replicated) experts per MoE layer (--hot-expert-num; moe_config.hot_expert_num)."""
    cold_token_percent: float = 1.0
    """Cold experts' capacity factor is moe_expert_capacity_factor x this, in (0, 1]; hot experts keep the
    full factor (--cold-token-percent; moe_config.cold_token_percent)."""
    moe_module_name: Optional[str] = None
    """Dotted path of the model's cell holding the MoE layers whose hot experts the ColdHotExpertMonitor
    manages, e.g. "language_model.encoder.layers"; None: every MoE layer (--moe-module-name;
    moe_config.moe_module_name)."""
    hot_expert_update_step: int = 10000
    """Iterations between re-choices of the hot experts from the measured token counts; 0 never re-chooses
    (--hot-expert-update-step; moe_config.update_step, MindFormers' default 10000)."""

    # --- checks ---------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether the model has MoE layers."""
        return self.num_experts is not None

    def aux_loss_coeff(self, kind: str) -> float:
        """The coefficient of aux-loss type `kind` (0 when that type is off), as Megatron's router reads it."""
        types = self.moe_router_load_balancing_type
        if isinstance(types, str):
            return float(self.moe_aux_loss_coeff) if types == kind else 0.0
        coeffs = self.moe_aux_loss_coeff
        return float(coeffs[types.index(kind)]) if kind in types else 0.0

    def tracked_losses(self) -> List[str]:
        """Names of the auxiliary losses this config logs, in Megatron's order."""
        names = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                 "global_aux_loss": "global_load_balancing_loss"}
        types = self.moe_router_load_balancing_type
        types = [types] if isinstance(types, str) else list(types)
        out = [names[t] for t in AUX_LOSS_TYPES if t in types]
        if self.moe_z_loss_coeff is not None:
            out.append("z_loss")
        return out

    def is_moe_layer(self, index: int, num_layers: int) -> bool:
        """Whether global layer `index` (0-based) is an MoE layer."""
        if not self.enabled:
            return False
        pattern = self.layer_pattern(num_layers)
        return bool(pattern[index])

    def layer_pattern(self, num_layers: int) -> List[int]:
        """0/1 per layer from moe_layer_freq."""
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [1 if i % freq == 0 else 0 for i in range(num_layers)]
        if len(freq) != num_layers:
            raise ValueError(f"--moe-layer-freq lists {len(freq)} layers but --num-layers is {num_layers}")
        return list(freq)

    def validate(self, hidden_size: int, ffn_hidden_size: int, num_layers: int, add_bias_linear: bool) -> None:
        """Checks that need only the model's sizes; fills moe_ffn_hidden_size. Raises ValueError naming the flag."""
        if not self.enabled:
            if self.moe_ffn_hidden_size is not None or self.moe_shared_expert_intermediate_size is not None:
                raise ValueError("--moe-ffn-hidden-size / --moe-shared-expert-intermediate-size are set but "
                                 "--num-experts is not; set --num-experts for an MoE model")
            tools = [flag for flag, on in (("--save-token-distribution", self.save_token_distribution),
                                           ("--callback-moe-droprate", self.callback_moe_droprate),
                                           ("--enable-cold-hot-expert", self.enable_cold_hot_expert)) if on]
            if tools:
                raise ValueError(f"{', '.join(tools)} need an MoE model: set --num-experts")
            return
        E, k = self.num_experts, self.moe_router_topk
        if E < 1:
            raise ValueError(f"--num-experts must be a positive number of experts, got {E}")
        if not 1 <= k <= E:
            raise ValueError(f"--moe-router-topk {k} must be between 1 and --num-experts {E}")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = ffn_hidden_size
        if self.first_k_dense_replace is not None:
            k_dense = int(self.first_k_dense_replace)
            if not 0 <= k_dense <= num_layers:
                raise ValueError(f"--first-k-dense-replace {k_dense} must be between 0 and --num-layers {num_layers}")
            self.moe_layer_freq = [0] * k_dense + [1] * (num_layers - k_dense)
        self.moe_layer_freq = parse_moe_layer_freq(self.moe_layer_freq)
        if isinstance(self.moe_layer_freq, int) and self.moe_layer_freq < 1:
            raise ValueError(f"--moe-layer-freq must be at least 1, got {self.moe_layer_freq}")
        self.layer_pattern(num_layers)  # a list of the wrong length fails here
        if self.moe_router_score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"--moe-router-score-function {self.moe_router_score_function!r} is not one of "
                             f"{SCORE_FUNCTIONS}")
        types = self.moe_router_load_balancing_type
        type_list = [types] if isinstance(types, str) else list(types)
        bad = [t for t in type_list if t not in LOAD_BALANCING_TYPES]
        if bad:
            hint = (" (quantile balancing is not implemented in mindtron)" if "quantile_balancing" in bad else "")
            raise ValueError(f"--moe-router-load-balancing-type {bad} is not one of {LOAD_BALANCING_TYPES}{hint}")
        if isinstance(types, list):
            if len(types) == 1:
                self.moe_router_load_balancing_type = types[0]
            elif any(t not in AUX_LOSS_TYPES for t in types):
                raise ValueError("a list of --moe-router-load-balancing-type values may only combine "
                                 f"{AUX_LOSS_TYPES}, got {types}")
        coeffs = self.moe_aux_loss_coeff
        if isinstance(coeffs, (list, tuple)):
            coeffs = [float(c) for c in coeffs]
            self.moe_aux_loss_coeff = coeffs[0] if len(coeffs) == 1 else coeffs
        if isinstance(self.moe_router_load_balancing_type, list) != isinstance(self.moe_aux_loss_coeff, list) or (
                isinstance(self.moe_aux_loss_coeff, list)
                and len(self.moe_aux_loss_coeff) != len(self.moe_router_load_balancing_type)):
            raise ValueError("--moe-aux-loss-coeff needs one value per --moe-router-load-balancing-type entry")
        if self.moe_router_load_balancing_type == "sinkhorn" and self.moe_aux_loss_coeff:
            raise ValueError("sinkhorn routing has no auxiliary loss: set --moe-aux-loss-coeff 0")
        if (k == 1 and self.moe_router_score_function == "softmax" and not self.moe_router_pre_softmax
                and self.moe_router_load_balancing_type != "sinkhorn"):
            raise ValueError("top-1 routing with softmax needs --moe-router-pre-softmax (a softmax over one logit "
                             "is constant and gives no gradient)")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function not in ("sigmoid", "sqrtsoftplus"):
            raise ValueError("--moe-router-enable-expert-bias works with --moe-router-score-function sigmoid or "
                             "sqrtsoftplus")
        if self.moe_router_group_topk:
            if not self.moe_router_num_groups:
                raise ValueError("--moe-router-group-topk needs --moe-router-num-groups")
            if E % self.moe_router_num_groups:
                raise ValueError(f"--moe-router-num-groups {self.moe_router_num_groups} must divide --num-experts {E}")
            if self.moe_router_group_topk > self.moe_router_num_groups:
                raise ValueError(f"--moe-router-group-topk {self.moe_router_group_topk} exceeds "
                                 f"--moe-router-num-groups {self.moe_router_num_groups}")
            if k % self.moe_router_group_topk:
                raise ValueError(f"--moe-router-topk {k} must be a multiple of --moe-router-group-topk "
                                 f"{self.moe_router_group_topk}")
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            raise ValueError(f"--moe-router-dtype {self.moe_router_dtype!r} is not one of fp32, fp64")
        cf = self.moe_expert_capacity_factor
        if cf is not None and cf <= 0:
            raise ValueError(f"--moe-expert-capacity-factor must be positive (leave it unset for dropless "
                             f"routing), got {cf}")
        if cf is not None and "sinkhorn" in type_list:
            raise ValueError("--moe-expert-capacity-factor works with the aux_loss, seq_aux_loss, global_aux_loss "
                             "and none load-balancing types")
        if self.moe_token_drop_policy not in DROP_POLICIES:
            raise ValueError(f"--moe-token-drop-policy {self.moe_token_drop_policy!r} is not one of {DROP_POLICIES}")
        if self.moe_pad_expert_input_to_capacity and cf is None:
            raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        if self.moe_token_dispatcher_type not in DISPATCHERS:
            raise ValueError(f"--moe-token-dispatcher-type {self.moe_token_dispatcher_type!r} is not available; "
                             f"use one of {DISPATCHERS} (the flex dispatcher needs DeepEP on NVIDIA GPUs)")
        if self.moe_apply_probs_on_input and k != 1:
            raise ValueError("--moe-apply-probs-on-input works with --moe-router-topk 1 only")
        if self.moe_shared_expert_intermediate_size is not None:
            if self.moe_shared_expert_intermediate_size <= 0:
                raise ValueError("--moe-shared-expert-intermediate-size must be positive")
            if add_bias_linear:
                raise ValueError("shared experts have no biases: add --disable-bias-linear")
        if self.moe_input_jitter_eps is not None and not 0.0 <= self.moe_input_jitter_eps < 1.0:
            raise ValueError(f"--moe-input-jitter-eps must be in [0, 1), got {self.moe_input_jitter_eps}")
        if self.moe_router_force_biased is not None and self.moe_router_force_biased > 0 and self.moe_layer_recompute:
            raise ValueError("--moe-router-force-biased with a positive std draws a new bias at every forward, "
                             "which a recomputed MoE layer would not repeat: use a negative std (one bias per "
                             "layer) or drop --moe-layer-recompute")
        if self.enable_cold_hot_expert:
            self._validate_hot_experts()

    def _validate_hot_experts(self) -> None:
        E, H = self.num_experts, self.hot_expert_num
        if isinstance(H, bool) or not 1 <= int(H) <= E:
            raise ValueError(f"--hot-expert-num (moe_config.hot_expert_num) must be between 1 and --num-experts "
                             f"{E} with --enable-cold-hot-expert, got {H}")
        if not 0.0 < float(self.cold_token_percent) <= 1.0:
            raise ValueError(f"--cold-token-percent (moe_config.cold_token_percent) must be in (0, 1], got "
                             f"{self.cold_token_percent}")
        if self.cold_token_percent < 1.0 and self.moe_expert_capacity_factor is None:
            raise ValueError("--cold-token-percent below 1 scales the cold experts' capacity, but the run is "
                             "dropless: set --moe-expert-capacity-factor (moe_config.capacity_factor)")
        if self.moe_token_dispatcher_type != "alltoall":
            raise ValueError("--enable-cold-hot-expert saves all-to-all traffic: it needs "
                             "--moe-token-dispatcher-type alltoall (the allgather dispatcher moves every token "
                             "to every rank anyway)")
        if self.hot_expert_update_step < 0:
            raise ValueError(f"--hot-expert-update-step (moe_config.update_step) must be >= 0 (0: never "
                             f"re-choose), got {self.hot_expert_update_step}")

    def validate_parallel(self, tensor_parallel: int, expert_parallel: int, expert_tensor_parallel: int,
                          sequence_parallel: bool, add_bias_linear: bool) -> None:
        """Checks that need the parallel sizes (before any process group exists)."""
        if not self.enabled:
            if expert_parallel > 1:
                raise ValueError("--expert-model-parallel-size > 1 needs an MoE model: set --num-experts")
            return
        if self.num_experts % expert_parallel:
            raise ValueError(f"--num-experts {self.num_experts} is not divisible by --expert-model-parallel-size "
                             f"{expert_parallel}: every expert-parallel rank holds the same number of experts")
        if self.moe_ffn_hidden_size % expert_tensor_parallel:
            raise ValueError(f"--moe-ffn-hidden-size {self.moe_ffn_hidden_size} is not divisible by the expert "
                             f"tensor-parallel size {expert_tensor_parallel} (--expert-tensor-parallel-size)")
        if self.enable_cold_hot_expert and expert_tensor_parallel > 1:
            raise ValueError("--enable-cold-hot-expert replicates whole experts: it needs expert tensor parallel "
                             f"size 1, got {expert_tensor_parallel}; set --expert-tensor-parallel-size 1")
        if add_bias_linear and expert_tensor_parallel > 1:
            raise ValueError("expert biases need --expert-tensor-parallel-size 1 (or --disable-bias-linear)")
        if tensor_parallel > 1 and not sequence_parallel:
            raise ValueError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (as in "
                             "Megatron-Core: each tensor-parallel rank routes its own part of the sequence)")
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and shared % tensor_parallel:
            raise ValueError(f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                             f"--tensor-model-parallel-size {tensor_parallel}")
