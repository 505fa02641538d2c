"""Megatron's command line for mindtron: parse Megatron-LM's flags (and document 002's YAML), check and derive
values the way Megatron's `validate_args` does, and map the result onto mindtron's typed configs.

    args = parse_args()                    # sys.argv, or parse_args(args=[...], world_size=8)
    set_args(args)                         # get_args() from anywhere afterwards
    all_config = init_configs_from_args(args)

Every flag of Megatron-LM's parser is accepted with its name, type and default (the table is in
`megatron_flags.py`). A flag that maps to a config field (CONFIG_MAP) or that this module consumes itself is
implemented; the others are listed in NOT_IMPLEMENTED and warn once when a user sets them. A flag Megatron
does not have is a ValueError that suggests the nearest real one. Nothing here touches a device or a
process group: the world size comes from msrun's MS_WORKER_NUM (or the `world_size` argument).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from mindtron.legacy_model.config import TransformerConfig, pad_vocab_size
from mindtron.training import megatron_flags as mf
from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig

__all__ = [
    "CONFIG_MAP", "NOT_IMPLEMENTED", "REFUSED_FLAGS", "MODEL_FLAGS_ACTED_ON", "NotImplementedFlagWarning", "parse_args",
    "validate_args", "load_yaml_config",
    "init_configs_from_args", "set_args", "get_args", "build_parser",
]

logger = logging.getLogger(__name__)

SECTIONS = ("model_config", "training_config", "dataset_config", "optimizer_config", "parallel_config")

# ---------------------------------------------------------------------------------------------------------
# Where each implemented flag lands: (dest on the parsed arguments, "section.field"). Document 002's five
# tables are all here (names with no config field yet are in NOT_IMPLEMENTED instead, see the report in
# tests/test_arguments.py); a field fed by several flags lists its YAML spelling's flag first.
# ---------------------------------------------------------------------------------------------------------
CONFIG_MAP: Tuple[Tuple[str, str], ...] = (
    # model_config (legacy_model.TransformerConfig)
    ("padded_vocab_size", "model_config.vocab_size"),
    ("make_vocab_size_divisible_by", "model_config.vocab_size"),
    ("hidden_size", "model_config.hidden_size"),
    ("seq_length", "model_config.seq_length"),
    ("num_layers", "model_config.num_layers"),
    ("num_attention_heads", "model_config.num_attention_heads"),
    ("group_query_attention", "model_config.group_query_attention"),
    ("num_query_groups", "model_config.num_query_groups"),
    ("kv_channels", "model_config.kv_channels"),
    ("ffn_hidden_size", "model_config.ffn_hidden_size"),
    ("max_position_embeddings", "model_config.max_position_embeddings"),
    ("position_embedding_type", "model_config.position_embedding_type"),
    ("use_rotary_position_embeddings", "model_config.use_rotary_embedding"),
    ("rotary_base", "model_config.rotary_base"),
    ("rotary_percent", "model_config.rotary_percent"),
    ("init_method_std", "model_config.init_method_std"),
    ("normalization", "model_config.normalization"),
    ("norm_epsilon", "model_config.norm_epsilon"),
    ("attention_dropout", "model_config.attention_dropout_rate"),
    ("hidden_dropout", "model_config.hidden_dropout_rate"),
    ("attention_softmax_in_fp32", "model_config.attention_softmax_in_fp32"),
    ("apply_query_key_layer_scaling", "model_config.apply_query_key_layer_scaling"),
    ("use_flash_attn", "model_config.use_flash_attention"),
    ("pre_tockens", "model_config.fa_config.pre_tokens"),
    ("next_tockens", "model_config.fa_config.next_tokens"),
    ("shape_order", "model_config.fa_config.input_layout"),
    ("untie_embeddings_and_output_weights", "model_config.untie_embeddings_and_output_weights"),
    ("transformer_impl", "model_config.transformer_impl"),
    # Megatron captures each layer as a CUDA graph and replays it; mindtron compiles each layer with jit
    ("enable_cuda_graph", "model_config.jit_layers"),
    ("recompute_granularity", "model_config.recompute_granularity"),
    ("recompute_method", "model_config.recompute_method"),
    ("recompute_num_layers", "model_config.recompute_num_layers"),
    ("fp16_lm_cross_entropy", "model_config.fp16_lm_cross_entropy"),
    ("fp32_residual_connection", "model_config.fp32_residual_connection"),
    ("add_bias_linear", "model_config.add_bias_linear"),
    ("add_qkv_bias", "model_config.qkv_has_bias"),
    ("add_dense_bias", "model_config.out_proj_has_bias"),
    ("use_sandwich_norm", "model_config.use_sandwich_norm"),
    ("attn_post_norm_scale", "model_config.attn_post_norm_scale"),
    ("ffn_post_norm_scale", "model_config.ffn_post_norm_scale"),
    ("params_dtype", "model_config.params_dtype"),
    ("compute_dtype", "model_config.compute_dtype"),
    ("embedding_dtype", "model_config.embedding_init_dtype"),
    ("hidden_act", "model_config.hidden_act"),
    ("swiglu", "model_config.hidden_act"),
    ("squared_relu", "model_config.hidden_act"),
    ("openai_gelu", "model_config.hidden_act"),
    ("bias_gelu_fusion", "model_config.bias_gelu_fusion"),
    ("use_fused_swiglu", "model_config.apply_swiglu_fusion"),
    ("apply_rope_fusion", "model_config.apply_rope_fusion"),
    ("use_fused_rope", "model_config.apply_rope_fusion"),
    ("use_fused_rmsnorm", "model_config.use_fused_rmsnorm"),
    ("sequence_parallel", "model_config.sequence_parallel"),
    ("num_layer_list", "model_config.num_layer_list"),
    ("num_layers_per_virtual_pipeline_stage", "model_config.num_layers_per_virtual_pipeline_stage"),
    # training_config
    ("seed", "training_config.seed"),
    ("train_iters", "training_config.training_iters"),
    ("train_samples", "training_config.train_samples"),
    ("log_interval", "training_config.log_interval"),
    ("eval_interval", "training_config.eval_interval"),
    ("eval_iters", "training_config.eval_iters"),
    ("save_interval", "training_config.save_interval"),
    ("exit_interval", "training_config.exit_interval"),
    ("exit_duration_in_mins", "training_config.exit_duration_in_mins"),
    ("micro_batch_size", "training_config.micro_batch_size"),
    ("global_batch_size", "training_config.global_batch_size"),
    ("gradient_accumulation_steps", "training_config.gradient_accumulation_steps"),
    ("bf16", "training_config.bf16"),
    ("fp16", "training_config.fp16"),
    ("accumulate_allreduce_grads_in_fp32", "training_config.accumulate_allreduce_grads_in_fp32"),
    ("loss_scale", "training_config.loss_scale"),
    ("initial_loss_scale", "training_config.loss_scale_value"),
    ("loss_scale_value", "training_config.loss_scale_value"),
    ("min_loss_scale", "training_config.min_loss_scale"),
    ("loss_scale_window", "training_config.loss_scale_window"),
    ("scale_window", "training_config.loss_scale_window"),
    ("hysteresis", "training_config.loss_scale_factor"),
    ("use_adaptive_loss_scale", "training_config.use_adaptive_loss_scale"),
    ("scale_factor", "training_config.scale_factor"),
    ("max_scale_window", "training_config.max_scale_window"),
    ("min_scale_window", "training_config.min_scale_window"),
    ("use_clip_grad", "training_config.use_clip_grad"),
    ("max_grad_norm", "training_config.max_grad_norm"),
    ("use_distributed_optimizer", "training_config.use_distributed_optimizer"),
    ("wrap_with_ddp", "training_config.wrap_with_ddp"),
    ("bucket_size", "training_config.bucket_size"),
    ("ddp_bucket_size", "training_config.bucket_size"),
    ("overlap_grad_reduce", "training_config.overlap_grad_reduce"),
    ("delay_grad_reduce", "training_config.delay_grad_reduce"),
    ("enable_mem_align", "training_config.enable_mem_align"),
    ("check_for_nan_in_loss_and_grad", "training_config.check_for_nan_in_loss_and_grad"),
    ("resume_training", "training_config.resume_training"),
    ("resume_crc_check", "training_config.crc_check"),
    ("load", "training_config.load_checkpoint"),
    ("save", "training_config.output_dir"),
    ("ckpt_prefix", "training_config.prefix"),
    ("ckpt_format", "training_config.ckpt_format"),
    ("keep_checkpoint_max", "training_config.keep_checkpoint_max"),
    ("no_load_optim", "training_config.no_load_optim"),
    ("no_load_rng", "training_config.no_load_rng"),
    ("no_save_optim", "training_config.no_save_optim"),
    ("no_save_rng", "training_config.no_save_rng"),
    ("finetune", "training_config.finetune"),
    ("new_dataset", "training_config.new_dataset"),
    ("profile", "training_config.profile"),
    ("profile_save_path", "training_config.profile_save_path"),
    ("profile_step_start", "training_config.profile_step_start"),
    ("profile_step_end", "training_config.profile_step_end"),
    # dataset_config
    ("micro_batch_size", "dataset_config.batch_size"),
    ("micro_batch_num", "dataset_config.micro_batch_num"),
    ("seq_length", "dataset_config.seq_length"),
    ("data_path", "dataset_config.data_path"),
    ("train_data_path", "dataset_config.train_data_path"),
    ("valid_data_path", "dataset_config.valid_data_path"),
    ("test_data_path", "dataset_config.test_data_path"),
    ("split", "dataset_config.split"),
    ("data_cache_path", "dataset_config.data_cache_path"),
    ("mock_data", "dataset_config.mock_data"),
    ("reset_attention_mask", "dataset_config.reset_attention_mask"),
    ("reset_position_ids", "dataset_config.reset_position_ids"),
    ("eod_mask_loss", "dataset_config.eod_mask_loss"),
    ("pad_token_id", "dataset_config.pad_token_id"),
    ("eos_token_id", "dataset_config.eos_token_id"),
    ("drop_remainder", "dataset_config.drop_remainder"),
    ("num_workers", "dataset_config.num_workers"),
    ("tokenizer_type", "dataset_config.tokenizer_type"),
    ("vocab_file", "dataset_config.vocab_file"),
    ("merge_file", "dataset_config.merge_file"),
    ("tokenizer_model", "dataset_config.tokenizer_model"),
    ("vocab_size", "dataset_config.vocab_size"),
    # optimizer_config
    ("optimizer", "optimizer_config.optimizer_type"),
    ("lr", "optimizer_config.learning_rate"),
    ("min_lr", "optimizer_config.min_lr"),
    ("adam_beta1", "optimizer_config.betas"),
    ("adam_beta2", "optimizer_config.betas"),
    ("adam_eps", "optimizer_config.eps"),
    ("sgd_momentum", "optimizer_config.sgd_momentum"),
    ("weight_decay", "optimizer_config.weight_decay"),
    ("start_weight_decay", "optimizer_config.start_weight_decay"),
    ("end_weight_decay", "optimizer_config.end_weight_decay"),
    ("weight_decay_incr_style", "optimizer_config.weight_decay_incr_style"),
    ("lr_decay_style", "optimizer_config.lr_decay_style"),
    ("lr_decay_iters", "optimizer_config.lr_decay_iters"),
    ("lr_decay_samples", "optimizer_config.lr_decay_samples"),
    ("lr_warmup_iters", "optimizer_config.lr_warmup_iters"),
    ("lr_warmup_samples", "optimizer_config.lr_warmup_samples"),
    ("lr_warmup_fraction", "optimizer_config.lr_warmup_fraction"),
    ("lr_warmup_init", "optimizer_config.lr_warmup_init"),
    ("lr_wsd_decay_style", "optimizer_config.lr_wsd_decay_style"),
    ("lr_wsd_decay_iters", "optimizer_config.lr_wsd_decay_iters"),
    ("lr_wsd_decay_samples", "optimizer_config.lr_wsd_decay_samples"),
    ("use_checkpoint_opt_param_scheduler", "optimizer_config.use_checkpoint_opt_param_scheduler"),
    ("override_opt_param_scheduler", "optimizer_config.override_opt_param_scheduler"),
    ("clip_grad", "optimizer_config.clip_grad"),
    ("overlap_param_gather", "optimizer_config.overlap_param_gather"),
    # parallel_config
    ("tensor_model_parallel_size", "parallel_config.tensor_model_parallel_size"),
    ("pipeline_model_parallel_size", "parallel_config.pipeline_model_parallel_size"),
    ("virtual_pipeline_model_parallel_size", "parallel_config.virtual_pipeline_model_parallel_size"),
    ("num_virtual_stages_per_pipeline_rank", "parallel_config.virtual_pipeline_model_parallel_size"),
    ("num_layers_per_virtual_pipeline_stage", "parallel_config.num_layers_per_virtual_pipeline_stage"),
    ("num_layer_list", "parallel_config.num_layer_list"),
    ("context_parallel_size", "parallel_config.context_parallel_size"),
    ("context_parallel_algo", "parallel_config.context_parallel_algo"),
    ("ulysses_degree_in_cp", "parallel_config.ulysses_degree_in_cp"),
    ("expert_model_parallel_size", "parallel_config.expert_model_parallel_size"),
    ("sequence_parallel", "parallel_config.sequence_parallel"),
    ("use_tp_pp_dp_mapping", "parallel_config.order"),
    ("recompute", "parallel_config.recompute"),
    ("select_recompute", "parallel_config.select_recompute"),
    ("select_comm_recompute", "parallel_config.select_comm_recompute"),
    # --- issue 14: core_r0.19.0 flags that change the model maths or the optimizer (dests as in the tsv) ---
    # norms and attention
    ("layernorm_zero_centered_gamma", "model_config.layernorm_zero_centered_gamma"),  # --apply-layernorm-1p
    ("qk_layernorm", "model_config.qk_layernorm"),
    ("qk_l2_norm", "model_config.qk_l2_norm"),
    ("window_size", "model_config.window_size"),
    ("window_attn_skip_freq", "model_config.window_attn_skip_freq"),
    ("softmax_type", "model_config.softmax_type"),
    ("attention_output_gate", "model_config.attention_output_gate"),
    # rotary embeddings (YaRN's values left unset keep Megatron's defaults, see _model_option_values)
    ("rotary_interleaved", "model_config.rotary_interleaved"),
    ("rotary_seq_len_interpolation_factor", "model_config.rotary_seq_len_interpolation_factor"),
    ("use_rope_scaling", "model_config.use_rope_scaling"),
    ("rope_scaling_factor", "model_config.rope_scaling_factor"),
    ("no_rope_freq", "model_config.no_rope_freq"),
    ("rotary_scaling_factor", "model_config.yarn_rotary_scaling_factor"),
    ("yarn_original_max_position_embeddings", "model_config.yarn_original_max_position_embeddings"),
    ("yarn_beta_fast", "model_config.yarn_beta_fast"),
    ("yarn_beta_slow", "model_config.yarn_beta_slow"),
    ("mscale", "model_config.yarn_mscale"),
    ("mscale_all_dim", "model_config.yarn_mscale_all_dim"),
    ("yarn_correction_range_round_to_int", "model_config.yarn_correction_range_round_to_int"),
    # MLP (--quick-geglu selects hidden_act "quick_geglu" in _validate_model)
    ("quick_geglu", "model_config.hidden_act"),
    ("glu_linear_offset", "model_config.glu_linear_offset"),
    ("activation_func_clamp_value", "model_config.activation_func_clamp_value"),
    ("bias_swiglu_fusion", "model_config.bias_swiglu_fusion"),
    # initialisation and loss
    ("init_method_xavier_uniform", "model_config.init_method_xavier_uniform"),
    ("embedding_init_method_std", "model_config.embedding_init_method_std"),
    ("calculate_per_token_loss", "model_config.calculate_per_token_loss"),
    # layers per pipeline stage
    ("decoder_first_pipeline_num_layers", "model_config.num_layers_in_first_pipeline_stage"),
    ("decoder_last_pipeline_num_layers", "model_config.num_layers_in_last_pipeline_stage"),
    ("account_for_embedding_in_pipeline_split", "model_config.account_for_embedding_in_pipeline_split"),
    ("account_for_loss_in_pipeline_split", "model_config.account_for_loss_in_pipeline_split"),
    ("pipeline_model_parallel_layout", "model_config.pipeline_model_parallel_layout"),
    # optimizer
    ("decoupled_lr", "optimizer_config.decoupled_lr"),
    ("decoupled_min_lr", "optimizer_config.decoupled_min_lr"),
    ("apply_wd_to_qk_layernorm", "optimizer_config.apply_wd_to_qk_layernorm"),
    # training loop
    ("iterations_to_skip", "training_config.iterations_to_skip"),
    # --- end of issue 14 rows ---
)

# Flags with no config field that this module itself acts on (derived values, deprecations, aliases) or
# that need nothing from mindtron (launcher bookkeeping, options Megatron itself ignores).
ARGUMENT_LAYER_DESTS = frozenset({
    "yaml_cfg", "encoder_num_layers", "encoder_seq_length", "recompute_activations", "add_position_embedding",
    "batch_size", "warmup", "model_parallel_size", "checkpoint_activations",  # deprecated: rejected with a hint
    "use_legacy_models", "deprecated_use_mcore_models", "local_rank",  # mindtron's model is Megatron's legacy one
    "async_tensor_model_parallel_allreduce", "fp8_interval", "use_dist_ckpt_deprecated",  # ignored by Megatron
    "dist_ckpt_format_deprecated", "ckpt_fully_parallel_save_deprecated",
})

# ---------------------------------------------------------------------------------------------------------
# Issue 14: the policy for core_r0.19.0's model / optimizer flags without a config field (one block).
# MODEL_FLAGS_ACTED_ON are read here; REFUSED_FLAGS are errors when set, with the reason (what cannot be
# done here); flags with no effect on the maths stay in NOT_IMPLEMENTED (one warning), see README.
# ---------------------------------------------------------------------------------------------------------
MODEL_FLAGS_ACTED_ON = frozenset({
    "no_weight_decay_cond_type",  # "apply_wd_to_qk_layernorm" sets --apply-wd-to-qk-layernorm, as Megatron
    "use_cpu_initialization",  # mindtron always initialises this way (layout-independent full tensors)
    "data_parallel_random_init",  # nothing to change without dropout; refused with dropout (below)
})

_FP8 = "FP8/FP4 training needs Transformer Engine's low-precision kernels, which MindSpore does not have"
_OPT_PRECISION = ("the optimizer keeps fp32 gradients, main parameters and moments; lower-precision optimizer "
                  "state (Megatron's precision-aware optimizer) is not implemented")
_NOT_GPT = "mindtron builds Megatron's GPT (attention + MLP layers) only"


def _set(value) -> bool:
    return value not in (None, False, 0, 0.0, "", [], ())


# dest -> (is the value refused?, why); the flag's name comes from the table.
REFUSED_FLAGS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "fp8": (_set, _FP8),
    "fp4": (_set, _FP8),
    "multi_latent_attention": (_set, "multi-latent attention (DeepSeek's MLA: low-rank query/key-value "
                               "projections with a separate RoPE part) is not implemented"),
    "mtp_num_layers": (_set, "multi-token prediction layers (MTP) are not implemented"),
    "position_embedding_type": (lambda v: v in ("mrope", "relative"),
                                "multimodal RoPE and T5's relative position buckets are not implemented; use "
                                "learned_absolute, rope, yarn or none"),
    "rope_type": (lambda v: v == "yarn", "Megatron takes --rope-type yarn only with multi-latent attention "
                  "(not implemented); use --position-embedding-type yarn for YaRN"),
    "experimental_attention_variant": (_set, "gated delta net and DeepSeek sparse attention are not implemented"),
    "linear_attention_freq": (_set, "linear-attention layers (gated delta net) are not implemented"),
    "hybrid_layer_pattern": (_set, "Mamba/hybrid models are not implemented; " + _NOT_GPT),
    "hybrid_override_pattern": (_set, "Mamba/hybrid models are not implemented; " + _NOT_GPT),
    "hybrid_attention_ratio": (_set, "Mamba/hybrid models are not implemented; " + _NOT_GPT),
    "hybrid_mlp_ratio": (_set, "Mamba/hybrid models are not implemented; " + _NOT_GPT),
    "is_hybrid_model": (_set, "Mamba/hybrid models are not implemented; " + _NOT_GPT),
    "spec": (_set, "a Megatron layer-spec module cannot be imported into MindSpore; " + _NOT_GPT),
    "heterogeneous_layers_config_path": (_set, "per-layer heterogeneous architectures are not implemented"),
    "heterogeneous_layers_config_encoded_json": (_set, "per-layer heterogeneous architectures are not implemented"),
    "use_mup": (_set, "maximal-update parameterisation (its width-scaled init, attention and output scales and "
                "per-parameter learning rates) is not implemented"),
    "qk_clip": (_set, "QK-clip rescales query/key weights after each Muon step; Muon is not available"),
    "grad_reduce_in_bf16": (_set, "gradients are accumulated and reduced in fp32 (bf16 reduction is not "
                            "implemented)"),
    "use_precision_aware_optimizer": (_set, _OPT_PRECISION),
    "main_grads_dtype": (lambda v: v not in (None, "fp32"), _OPT_PRECISION),
    "main_params_dtype": (lambda v: v not in (None, "fp32"), _OPT_PRECISION),
    "exp_avg_dtype": (lambda v: v not in (None, "fp32"), _OPT_PRECISION),
    "exp_avg_sq_dtype": (lambda v: v not in (None, "fp32"), _OPT_PRECISION),
    "freeze_all_layers": (_set, "it freezes every parameter (Megatron uses it to save logits); nothing would train"),
    "kitchen_config_file": (_set, "NVIDIA kitchen quantization recipes are not available"),
    "kitchen_recipe_number": (_set, "NVIDIA kitchen quantization recipes are not available"),
}

# ---------------------------------------------------------------------------------------------------------
# Megatron flags mindtron accepts but does not implement yet: setting one to a non-default value warns once.
# Shrink this set as features land (tests/test_arguments.py checks it is exactly "all flags minus CONFIG_MAP
# minus ARGUMENT_LAYER_DESTS", so a newly mapped flag must be removed here).
# ---------------------------------------------------------------------------------------------------------
_NOT_IMPLEMENTED_TEXT = """
    # network size
    --decoder-num-layers --attention-backend
    --relative-attention-num-buckets --relative-attention-max-distance
    --mrope-section
    --apply-residual-connection-post-layernorm
    --onnx-safe --bert-no-binary-head
    --mtp-loss-scaling-factor
    # regularization
    --muon-momentum --muon-no-split-qkv --muon-use-nesterov --muon-scale-mode --muon-fp32-matmul-prec
    --muon-num-ns-steps --muon-tp-mode --muon-extra-scale-factor
    # training
    --rampup-batch-size --decrease-batch-size-if-needed --check-for-spiky-loss
    --check-for-large-grads --distribute-saved-activations --recompute-modules --cpu-offloading-num-layers
    --no-clone-scatter-output-in-embedding --result-rejected-tracker-filename
    --disable-gloo-process-groups --use-pytorch-profiler --profile-ranks --record-memory-history
    --memory-snapshot-path --tp-comm-overlap --tp-comm-overlap-cfg --disable-tp-comm-overlap-ag
    --disable-tp-comm-overlap-rs --tp-comm-overlap-rs-dgrad --disable-tp-comm-bulk-dgrad
    --disable-tp-comm-bulk-wgrad --tp-comm-bootstrap-backend --empty-unused-memory-level
    --deterministic-mode --check-weight-hash-across-dp-replicas-interval
    --train-sync-interval --exit-signal-handler --tensorboard-dir --no-masked-softmax-fusion
    --use-fused-weighted-squared-relu --no-bias-dropout-fusion --cross-entropy-loss-fusion
    --cross-entropy-fusion-impl --optimizer-cpu-offload --optimizer-offload-fraction
    --use-torch-optimizer-for-cpu-offload --overlap-cpu-optimizer-d2h-h2d --dump-param-to-param-group-map
    --no-pin-cpu-grads --no-pin-cpu-params --dataloader-type --no-persist-layer-norm
    --no-gradient-accumulation-fusion --manual-gc --manual-gc-interval --no-manual-gc-eval
    --disable-tp-comm-split-ag --disable-tp-comm-split-rs --pipeline-model-parallel-comm-backend
    --high-priority-stream-groups --use-te-activation-func
    # rl
    --perform-rl-step --rl-prompts-per-eval --grpo-prompts-per-step --grpo-group-size --grpo-iterations
    --grpo-clamp-eps-lower --grpo-clamp-eps-upper --grpo-kl-beta --grpo-entropy-term-weight
    --grpo-filter-groups-with-same-reward --grpo-default-temperature --grpo-default-top-p
    --langrl-inference-server-type --langrl-inference-server-conversation-template --langrl-external-server
    --langrl-env-config --rl-offload-optimizer-during-inference --rl-offload-kv-cache-during-training
    --rl-remove-kv-cache-during-training --rl-reset-cuda-graphs --rl-partial-rollouts
    --rl-inference-logprobs-is-correction --rl-importance-sampling-truncation-coef
    --rl-calculate-intra-group-similarity --rl-use-sequence-packing --rl-sequence-packing-bin-size
    --rl-sequence-packing-algo
    # initialization
    # learning rate
    # checkpointing
    --save-retain-interval --load-main-params-from-ckpt --no-strict-fsdp-dtensor-load --non-persistent-save-interval
    --non-persistent-ckpt-type --non-persistent-global-ckpt-dir --non-persistent-local-ckpt-dir
    --non-persistent-local-ckpt-algo --pretrained-checkpoint --ckpt-step --no-initialization --use-checkpoint-args
    --use-mp-args-from-checkpoint-args --no-use-tokenizer-model-from-checkpoint-args --exit-on-missing-checkpoint
    --use-persistent-ckpt-worker --auto-detect-ckpt-format --ckpt-convert-format --ckpt-convert-save
    --ckpt-convert-update-legacy-dist-opt-format --no-ckpt-fully-parallel-save --async-save
    --ckpt-fully-parallel-load --ckpt-assume-constant-structure --dist-ckpt-strictness
    --dist-ckpt-save-pre-mcore-014 --dist-ckpt-optim-fully-reshardable
    --distrib-optim-fully-reshardable-mem-efficient
    # mixed precision
    --disable-bf16-reduced-precision-matmul --reuse-grad-buf-for-mxfp8-param-ag
    # distributed
    --microbatch-group-size-per-virtual-pipeline-stage --no-overlap-p2p-communication
    --overlap-p2p-communication-warmup-flush --distributed-backend --distributed-timeout-minutes
    --distributed-timeout-seconds-after-init --defer-embedding-wgrad-compute --wgrad-deferral-limit
    --no-align-grad-reduce --ddp-num-buckets --ddp-pad-buckets-for-high-nccl-busbw
    --ddp-reduce-scatter-with-fp32-accumulation --ddp-average-in-collective
    --overlap-param-gather-with-optimizer-step --no-align-param-gather --no-scatter-gather-tensors-in-pipeline
    --use-ring-exchange-p2p --lazy-mpu-init
    --use-nccl-ub --disable-symmetric-registration --use-sharp
    --sharp-enabled-group --use-megatron-fsdp --init-model-with-meta-device --data-parallel-sharding-strategy
    --no-gradient-reduce-div-fusion --fsdp-double-buffer --suggested-communication-unit-size
    --keep-fp8-transpose-cache --enable-full-sharding-in-hsdp --num-distributed-optimizer-instances
    --use-torch-fsdp2 --torch-fsdp2-no-reshard-after-forward --cp-comm-type --hierarchical-context-parallel-sizes
    --nccl-communicator-config-path --replication --replication-jump --replication-factor
    # validation
    --full-validation --multiple-validation-sets --test-mode --skip-train
    # data and dataloader
    --data-args-path --per-split-data-args-path --no-mmap-bin-files --decoder-seq-length --retriever-seq-length
    --sample-rate --mask-prob --short-seq-prob --no-create-attention-mask-in-dataloader
    --num-dataset-builder-threads --object-storage-cache-path --mid-level-dataset-surplus
    --allow-ambiguous-pad-tokens
    # tokenizer
    --vocab-extra-ids --tokenizer-metadata --tiktoken-pattern --tiktoken-num-special-tokens
    --tiktoken-special-tokens --legacy-tokenizer --trust-remote-code
    # autoresume
    --adlr-autoresume --adlr-autoresume-interval
    # biencoder
    --ict-head-size --biencoder-projection-dim --biencoder-shared-query-context-model --ict-load --bert-load
    --titles-data-path --query-in-block-prob --use-one-sent-docs --evidence-data-path
    --retriever-report-topk-accuracies --retriever-score-scaling --block-data-path --embedding-path
    --indexer-batch-size --indexer-log-interval
    # vision
    --num-classes --img-h --img-w --num-channels --patch-dim --classes-fraction --data-per-class-fraction
    --no-data-sharding --head-lr-mult --vision-pretraining --vision-pretraining-type --vision-backbone-type
    --swin-backbone-type --mask-type --mask-factor --iter-per-epoch --dino-local-img-size --dino-local-crops-number
    --dino-head-hidden-size --dino-bottleneck-size --dino-freeze-last-layer --dino-norm-last-layer
    --dino-warmup-teacher-temp --dino-teacher-temp --dino-warmup-teacher-temp-epochs
    # moe
    --expert-tensor-parallel-size --num-experts --moe-layer-freq --moe-ffn-hidden-size
    --moe-shared-expert-intermediate-size --moe-shared-expert-overlap --moe-grouped-gemm
    --moe-use-legacy-grouped-gemm --moe-layer-recompute --moe-extended-tp --moe-use-upcycling
    --moe-router-load-balancing-type --moe-router-dtype --moe-router-fusion --moe-router-score-function
    --moe-router-topk --moe-router-pre-softmax --moe-router-num-groups --moe-router-group-topk
    --moe-router-topk-scaling-factor --moe-router-enable-expert-bias --moe-router-bias-update-rate
    --moe-router-force-load-balancing --moe-router-padding-for-fp8 --moe-aux-loss-coeff --moe-z-loss-coeff
    --moe-input-jitter-eps --moe-per-layer-logging --moe-token-dispatcher-type --moe-enable-deepep
    --moe-deepep-num-sms --moe-permute-fusion --moe-expert-capacity-factor --moe-pad-expert-input-to-capacity
    --moe-token-drop-policy --moe-apply-probs-on-input --overlap-moe-expert-parallel-comm --delay-wgrad-compute
    --moe-upcycling-granularity --moe-pad-experts-for-cuda-graph-inference
    # mla
    --q-lora-rank --kv-lora-rank --qk-head-dim --qk-pos-emb-head-dim --v-head-dim
    --cache-mla-latents
    # heterogeneous architecture
    # logging
    --log-params-norm --log-num-zeros-in-grad --log-throughput --log-progress --timing-log-level --log-energy
    --no-barrier-with-level-1-timing --timing-log-option --tensorboard-log-interval --tensorboard-queue-size
    --log-timers-to-tensorboard --no-log-loss-scale-to-tensorboard --log-validation-ppl-to-tensorboard
    --log-memory-to-tensorboard --log-world-size-to-tensorboard --wandb-project --wandb-entity --wandb-exp-name
    --wandb-save-dir --logging-level
    # straggler
    --log-straggler --disable-straggler-on-startup --straggler-ctrlr-port --straggler-minmax-count
    # workload inspector
    --run-workload-inspector-server
    # inference
    --inference-batch-times-seqlen-threshold --max-tokens-to-oom --output-bert-embeddings --bert-embedder-type
    --flash-decode --cuda-graph-warmup-steps --external-cuda-graph --cuda-graph-impl
    --cuda-graph-scope --use-legacy-static-engine --inference-max-requests --inference-max-seq-length
    --inference-max-batch-size --inference-dynamic-batching --inference-dynamic-batching-buffer-size-gb
    --inference-dynamic-batching-block-size --inference-dynamic-batching-buffer-guaranteed-fraction
    --inference-dynamic-batching-buffer-overflow-factor --inference-dynamic-batching-max-requests-override
    --inference-dynamic-batching-max-tokens-override --inference-dynamic-batching-num-cuda-graphs
    --inference-dynamic-batching-track-paused-request-events --decode-only-cuda-graphs
    --inference-dynamic-batching-unified-memory-level --symmetric-ar-type --nccl-all-reduce-for-prefill
    --mlp-chunks-for-prefill --disable-chunked-prefill --inference-wandb-logging-step-interval
    # Transformer-Engine
    --fp8-recipe --fp8-quantizer-factory --fp8-margin --fp8-amax-history-len --fp8-amax-compute-algo
    --no-fp8-wgrad --fp8-param-gather --first-last-layers-bf16 --num-layers-at-start-in-bf16
    --num-layers-at-end-in-bf16 --fp4-recipe --fp4-quantizer-factory --fp4-param-gather
    --te-rng-tracker --inference-rng-tracker
    # retro
    --retro-project-dir --retro-add-retriever --retro-cyclic-train-iters --retro-encoder-layers
    --retro-encoder-hidden-dropout --retro-encoder-attention-dropout --retro-num-neighbors
    --retro-num-retrieved-chunks --retro-attention-gate --retro-no-verify-neighbor-count
    # experimental
    --enable-experimental
    --mamba-state-dim --mamba-head-dim --mamba-num-groups --mamba-num-heads
    --disable-mamba-mem-eff-path
    # one logger
    --no-one-logger --one-logger-project --one-logger-run-name --one-logger-async --app-tag-run-name
    --app-tag-run-version
    # In-process restart
    --inprocess-restart --inprocess-max-iterations --inprocess-monitor-thread-interval
    --inprocess-monitor-process-interval --inprocess-progress-watchdog-interval --inprocess-heartbeat-interval
    --inprocess-soft-timeout --inprocess-hard-timeout --inprocess-heartbeat-timeout --inprocess-barrier-timeout
    --inprocess-completion-timeout --inprocess-last-call-wait --inprocess-termination-grace-time
    --inprocess-granularity --inprocess-active-world-size --inprocess-empty-cuda-cache
    # ft_package
    --enable-ft-package --calc-ft-timeouts
    # config logger
    --config-logger-dir
    # rerun engine
    --error-injection-rate --error-injection-type --rerun-mode
    # msc
    --disable-msc
    # kitchen
    # sft
    --sft --sft-tokenizer-prompt-format
    # mindtron: training (documents 000-002)
    --profile-level --profile-with-stack --profile-memory --profile-framework --profile-communication
    --profile-parallel-strategy --profile-aicore-metrics --profile-l2-cache --profile-hbm-ddr --profile-pcie
    --profile-data-process --profile-data-simplification --profile-op-time --profile-offline-analyse
    --profile-dynamic-profiler-config-path
"""
NOT_IMPLEMENTED = frozenset(name for line in _NOT_IMPLEMENTED_TEXT.splitlines()
                            if not line.lstrip().startswith("#") for name in line.split())


class NotImplementedFlagWarning(UserWarning):
    """A Megatron flag (or value) that mindtron accepts but does not act on yet."""


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    # One warning per flag per process, whatever the warnings filter says.
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, NotImplementedFlagWarning, stacklevel=4)  # points at the parse_args() call


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise ValueError(f"{message} (python <script> --help lists Megatron's flags)")


def build_parser(extra_args_provider: Optional[Callable] = None) -> argparse.ArgumentParser:
    """Megatron's parser (all flags of `megatron_flags`), plus `extra_args_provider(parser)`'s own flags."""
    parser = mf.build_parser(_Parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def _option_names(parser: argparse.ArgumentParser) -> List[str]:
    return [o for action in parser._actions for o in action.option_strings]  # noqa: SLF001 - argparse has no API


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests the command line sets itself (a flag given with its default value counts)."""
    actions = parser._actions  # noqa: SLF001
    saved = [a.default for a in actions]
    saved_defaults = parser._defaults  # noqa: SLF001
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        parser._defaults = {}  # noqa: SLF001
        namespace, _ = parser.parse_known_args(list(argv))
    finally:
        for a, default in zip(actions, saved):
            a.default = default
        parser._defaults = saved_defaults  # noqa: SLF001
    return set(vars(namespace))


def _flag_label(dest: str) -> str:
    flag = mf.FLAGS_BY_DEST.get(dest)
    return flag.name if flag is not None else f"--{dest.replace('_', '-')}"


def _world_size_from_env() -> int:
    # msrun sets MS_WORKER_NUM for every worker; a plain `python script.py` is one process.
    return int(os.getenv("MS_WORKER_NUM", "1"))


def _rank_from_env() -> int:
    for name in ("RANK_ID", "MS_NODE_ID", "RANK"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def parse_args(extra_args_provider: Optional[Callable] = None, ignore_unknown_args: bool = False,
               args: Optional[Sequence[str]] = None, *, world_size: Optional[int] = None,
               args_defaults: Optional[Dict[str, Any]] = None, validate: bool = True) -> argparse.Namespace:
    """Parse Megatron's flags from `args` (default `sys.argv[1:]`) like Megatron's parse_args + validate_args.

    `extra_args_provider(parser)` adds a script's own flags. A flag Megatron does not have raises ValueError
    naming the closest real flag, unless `ignore_unknown_args`. `--yaml-cfg PATH` (or `--config PATH`)
    loads document 002's YAML layout or a flat `dest: value` file first; flags given on the command line
    win over it. `args_defaults` fills arguments the user left unset (Megatron's `args_defaults`).
    `world_size` defaults to msrun's MS_WORKER_NUM, else 1. With `validate` (default) the derived values
    (data-parallel size, global batch, virtual pipeline size, ffn size, dtypes, ...) are computed and
    invalid combinations raise ValueError; no device or process group is touched.
    """
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    parser = build_parser(extra_args_provider)
    namespace, unknown = parser.parse_known_args(argv)
    unknown_flags = [u.split("=", 1)[0] for u in unknown if u.startswith("--") or
                     (u.startswith("-") and len(u) > 1 and not u[1].isdigit() and u[1] != ".")]
    if unknown_flags and not ignore_unknown_args:
        names = _option_names(parser)
        problems = [f"{u}{_suggest(u, names)}" for u in unknown_flags]
        raise ValueError("unknown argument(s), not a Megatron-LM or mindtron flag: " + "; ".join(problems))
    if unknown and not unknown_flags and not ignore_unknown_args:
        raise ValueError(f"unexpected value(s) {unknown} on the command line: every value follows its flag")

    explicit = _explicit_dests(parser, argv)
    user_set = set(explicit)
    if namespace.yaml_cfg:
        from_yaml = load_yaml_config(namespace.yaml_cfg, parser, ignore_unknown=ignore_unknown_args)
        for dest, value in from_yaml.items():
            if dest not in explicit:  # the command line overrides the file
                setattr(namespace, dest, value)
        user_set |= set(from_yaml)
    namespace.explicit_args = sorted(user_set)
    _warn_not_implemented(namespace, user_set)
    if validate:
        validate_args(namespace, args_defaults or {}, world_size=world_size)
    elif args_defaults:
        _apply_defaults(namespace, args_defaults)
    return namespace


def _warn_not_implemented(args: argparse.Namespace, user_set: Iterable[str]) -> None:
    for dest in sorted(user_set):
        flag = mf.FLAGS_BY_DEST.get(dest)
        if flag is None or flag.name not in NOT_IMPLEMENTED:
            continue
        if getattr(args, dest, flag.default) != flag.default:
            _warn_once(flag.name, f"{flag.name} is accepted for Megatron compatibility but not implemented in "
                                  "mindtron yet; it has no effect")


# ---------------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------------
def _field_to_dest() -> Dict[Tuple[str, str], str]:
    # "section.field" -> the flag a YAML value for it sets (the first CONFIG_MAP row for the field).
    reverse: Dict[Tuple[str, str], str] = {}
    for dest, target in CONFIG_MAP:
        section, field = target.split(".", 1)
        reverse.setdefault((section, field.split(".")[0]), dest)
    return reverse


_FIELD_TO_DEST = _field_to_dest()
# Fields whose YAML value does not copy onto one flag.
_FIELD_SPECIAL = {("optimizer_config", "betas"), ("model_config", "fa_config"), ("parallel_config", "order")}
_FA_KEYS = {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens", "input_layout": "shape_order"}
_ORDERS = {"tp-cp-ep-dp-pp": False, "tp-cp-ep-pp-dp": True}


def load_yaml_config(path: str, parser: Optional[argparse.ArgumentParser] = None,
                     ignore_unknown: bool = False) -> Dict[str, Any]:
    """Read a YAML file into {dest: value} for the parser's flags.

    Two layouts, mixable: document 002's sections `model_config`, `training_config`, `dataset_config`,
    `optimizer_config`, `parallel_config` keyed by the config field names (Megatron dest names are accepted
    inside them too), and flat `dest: value` pairs with Megatron's names (`num_layers: 24`,
    `tensor-model-parallel-size: 2`). Values are converted and checked like command-line text; null means
    "not set". Unknown keys raise ValueError with the closest known name, unless `ignore_unknown`.
    """
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--yaml-cfg {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--yaml-cfg {path}: expected a mapping of sections or flags at the top level")
    parser = parser or build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}  # noqa: SLF001
    options = {o: a for a in actions.values() for o in a.option_strings}
    out: Dict[str, Any] = {}
    problems: List[str] = []

    def put(dest: str, value: Any, where: str) -> None:
        if value is None:
            return
        action = actions[dest]
        try:
            out[dest] = _convert(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"--yaml-cfg {path}: {where}: {err}") from None

    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"--yaml-cfg {path}: section {name} must be a mapping of field: value")
            for field, item in value.items():
                field = str(field).replace("-", "_")
                where = f"{name}.{field}"
                if (name, field) in _FIELD_SPECIAL:
                    for dest, v in _special_yaml(name, field, item, where):
                        put(dest, v, where)
                elif (name, field) in _FIELD_TO_DEST:
                    put(_FIELD_TO_DEST[(name, field)], item, where)
                elif field in actions:
                    put(field, item, where)
                else:
                    known = [f for (s, f) in _FIELD_TO_DEST if s == name] + [f for (s, f) in _FIELD_SPECIAL
                                                                              if s == name]
                    problems.append(f"{where}{_suggest(field, known)}")
        elif name in actions:
            put(name, value, name)
        elif "--" + name.replace("_", "-") in options:
            # an option spelled as a key, e.g. `disable_bias_linear: true` (dest add_bias_linear)
            action = options["--" + name.replace("_", "-")]
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
                if mf.str_to_bool(value):
                    out[action.dest] = action.const
            else:
                put(action.dest, value, name)
        else:
            problems.append(f"{key}{_suggest(name, list(actions) + list(SECTIONS))}")
    if problems and not ignore_unknown:
        raise ValueError(f"--yaml-cfg {path}: unknown key(s): " + "; ".join(problems))
    return out


def _special_yaml(section: str, field: str, value: Any, where: str) -> List[Tuple[str, Any]]:
    if value is None:
        return []
    if (section, field) == ("optimizer_config", "betas"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{where}: betas must be a pair [beta1, beta2], got {value!r}")
        return [("adam_beta1", value[0]), ("adam_beta2", value[1])]
    if (section, field) == ("model_config", "fa_config"):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: fa_config must be a mapping of pre_tokens/next_tokens/input_layout")
        unknown = set(value) - set(_FA_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use {sorted(_FA_KEYS)}")
        return [(_FA_KEYS[k], v) for k, v in value.items()]
    if value not in _ORDERS:  # parallel_config.order
        raise ValueError(f"{where}: order {value!r} is not one of {sorted(_ORDERS)}")
    return [("use_tp_pp_dp_mapping", _ORDERS[value])]


def _convert(action: argparse.Action, value: Any) -> Any:
    """A YAML value as argparse would have produced it from text (types, nargs, choices)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,  # noqa: SLF001
                           argparse.BooleanOptionalAction)):
        return mf.str_to_bool(value)
    convert = action.type

    def one(item):
        if isinstance(item, bool) and convert in (int, float):
            raise ValueError(f"expected a number, got {item!r}")
        if convert is None:
            out = item
        elif convert is str:
            out = str(item)
        elif convert is int and isinstance(item, float):
            if not item.is_integer():
                raise ValueError(f"expected an integer, got {item!r}")
            out = int(item)
        else:  # text through the flag's own converter; the table's converters also take parsed values
            out = convert(item)
        if action.choices is not None and out not in action.choices:
            raise ValueError(f"invalid choice {out!r} (choose from {', '.join(map(repr, action.choices))})")
        return out

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [one(v) for v in items]
    return one(value)


# ---------------------------------------------------------------------------------------------------------
# validate_args: Megatron's derived values and checks, the parts that apply to mindtron
# ---------------------------------------------------------------------------------------------------------
_DTYPE_LONG = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}
_GPT2_VOCAB = 50257  # GPT-2 BPE, Megatron's usual tokenizer, when no vocabulary size is known yet


def _apply_defaults(args: argparse.Namespace, defaults: Dict[str, Any]) -> None:
    # Megatron: a script's default applies only where the user left the argument at None.
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_args(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None,
                  world_size: Optional[int] = None) -> argparse.Namespace:
    """Megatron's validate_args for mindtron: fill derived values in place and raise ValueError (naming the
    flag and the fix) for invalid combinations. Returns `args`."""
    user = set(getattr(args, "explicit_args", ()))
    args.world_size = int(world_size if world_size is not None else _world_size_from_env())
    args.rank = _rank_from_env()
    _need(args.world_size >= 1, f"world size must be positive, got {args.world_size}")

    # Deprecated flags Megatron rejects.
    for dest, use in (("batch_size", "--micro-batch-size"), ("warmup", "--lr-warmup-fraction or --lr-warmup-iters"),
                      ("model_parallel_size", "--tensor-model-parallel-size")):
        _need(getattr(args, dest) is None, f"{_flag_label(dest)} is no longer valid; use {use} instead")
    _need(not args.checkpoint_activations, "--checkpoint-activations is no longer valid; use "
          "--recompute-activations, or --recompute-granularity and --recompute-method")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    # document 002's recompute switches select Megatron's granularities
    if args.recompute and args.recompute_granularity is None:
        args.recompute_granularity = "full"
        args.recompute_method = args.recompute_method or "uniform"
    if args.select_recompute and args.recompute_granularity is None:
        args.recompute_granularity = "selective"
    args.recompute = args.recompute or args.recompute_granularity == "full"
    args.select_recompute = args.select_recompute or args.recompute_granularity == "selective"

    # Parallel sizes and the data-parallel size.
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    for dest, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", args.expert_model_parallel_size)):
        _need(value >= 1, f"{_flag_label(dest)} must be at least 1, got {value}")
    model_size = tp * pp * cp
    _need(args.world_size % model_size == 0,
          f"world size ({args.world_size}) is not divisible by --tensor-model-parallel-size {tp} x "
          f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp} = {model_size}; change the "
          "parallel sizes or the number of workers (msrun --worker_num)")
    args.transformer_pipeline_model_parallel_size = pp
    args.data_parallel_size = args.world_size // model_size
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = tp

    _apply_defaults(args, defaults or {})

    if args.data_path is not None and args.split is None:
        logger.warning("--data-path without --split: using Megatron's legacy default split 969, 30, 1")
        args.split = "969, 30, 1"
    _need(bool(args.mock_data) + bool(args.data_path) +
          any([args.train_data_path, args.valid_data_path, args.test_data_path]) <= 1,
          "give a single data source: --mock-data, --data-path, or --train/--valid/--test-data-path")

    _validate_batch(args, user)

    # Model shape.
    if args.num_layers is not None:
        _need(args.encoder_num_layers in (None, args.num_layers), "give --num-layers or --encoder-num-layers, "
              "not both")
        args.encoder_num_layers = args.num_layers
    else:
        args.num_layers = args.encoder_num_layers
    if args.seq_length is not None:
        _need(args.encoder_seq_length in (None, args.seq_length), "give --seq-length or --encoder-seq-length, "
              "not both")
        args.encoder_seq_length = args.seq_length
    else:
        args.seq_length = args.encoder_seq_length
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _need(getattr(args, dest) is not None,
              f"{_flag_label(dest)} is required: give it on the command line or in the --yaml-cfg file")
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        _need(getattr(args, dest) > 0, f"{_flag_label(dest)} must be positive, got {getattr(args, dest)}")
    if args.max_position_embeddings is None:
        # Megatron requires it; mindtron sizes the position table from --seq-length when it is left out.
        args.max_position_embeddings = args.seq_length
    _need(args.max_position_embeddings >= args.seq_length,
          f"max_position_embeddings ({args.max_position_embeddings}) must be greater than or equal to "
          f"seq_length ({args.seq_length}): raise --max-position-embeddings or lower --seq-length")
    if args.decoder_seq_length is not None:
        _need(args.max_position_embeddings >= args.decoder_seq_length,
              "--decoder-seq-length must not exceed --max-position-embeddings")
    if cp > 1:
        _need(args.seq_length % (2 * cp) == 0, f"--seq-length {args.seq_length} must be a multiple of 2 x "
              f"--context-parallel-size ({2 * cp}) when --context-parallel-size > 1")

    _validate_model_options(args, user)
    _validate_pipeline(args, user)
    _validate_model(args, user)
    _validate_precision(args, user)
    _validate_schedule(args, user)
    _validate_misc(args, user)
    return args


def _validate_batch(args: argparse.Namespace, user: set) -> None:
    _need(args.micro_batch_size is not None, "--micro-batch-size is required (samples per micro-batch per "
          "data-parallel rank)")
    _need(args.micro_batch_size > 0, f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    dp, micro = args.data_parallel_size, args.micro_batch_size
    accum = [(d, getattr(args, d)) for d in ("gradient_accumulation_steps", "micro_batch_num")
             if getattr(args, d) is not None]
    for dest, value in accum:
        _need(value >= 1, f"{_flag_label(dest)} must be at least 1, got {value}")
    if len({v for _, v in accum}) > 1:
        raise ValueError("--gradient-accumulation-steps and --micro-batch-num disagree; give one of them")
    if args.global_batch_size is None:
        args.global_batch_size = micro * dp * (accum[0][1] if accum else 1)
        logger.info("setting global batch size to %d", args.global_batch_size)
    _need(args.global_batch_size > 0, f"--global-batch-size must be positive, got {args.global_batch_size}")
    if args.rampup_batch_size is None:
        _need(args.global_batch_size % (micro * dp) == 0,
              f"global batch size ({args.global_batch_size}) is not divisible by micro batch size ({micro}) "
              f"times data parallel size ({dp}): change --global-batch-size, --micro-batch-size or the "
              "parallel sizes")
        micro_batches = args.global_batch_size // (micro * dp)
        for dest, value in accum:
            _need(value == micro_batches,
                  f"{_flag_label(dest)} {value} does not match --global-batch-size {args.global_batch_size} / "
                  f"(--micro-batch-size {micro} x data-parallel size {dp}) = {micro_batches}; give only one")
        args.gradient_accumulation_steps = micro_batches
        args.micro_batch_num = micro_batches


def _validate_pipeline(args: argparse.Namespace, user: set) -> None:
    pp = args.pipeline_model_parallel_size
    chosen = [d for d in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                          "pipeline_model_parallel_layout") if getattr(args, d) is not None]
    _need(len(chosen) <= 1, "no more than one of --num-layers-per-virtual-pipeline-stage, "
          "--num-virtual-stages-per-pipeline-rank and --pipeline-model-parallel-layout can be set")
    explicit_vpp = args.virtual_pipeline_model_parallel_size
    num_layers = args.num_layers + int(args.account_for_embedding_in_pipeline_split) + \
        int(args.account_for_loss_in_pipeline_split)
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        _need(args.decoder_first_pipeline_num_layers is None and args.decoder_last_pipeline_num_layers is None,
              "uneven pipeline stages (--decoder-first/last-pipeline-num-layers) need "
              "--num-virtual-stages-per-pipeline-rank instead of --num-layers-per-virtual-pipeline-stage")
        per_layer_chunk = args.num_layers_per_virtual_pipeline_stage
        _need(per_layer_chunk > 0, "--num-layers-per-virtual-pipeline-stage must be positive")
        _need(num_layers % pp == 0, f"number of layers of the model ({num_layers}) must be divisible by "
              f"--pipeline-model-parallel-size {pp}")
        per_stage = num_layers // pp
        _need(per_stage % per_layer_chunk == 0,
              f"number of layers per pipeline stage ({per_stage}) must be divisible by "
              f"--num-layers-per-virtual-pipeline-stage {per_layer_chunk}")
        vpp = per_stage // per_layer_chunk
        if explicit_vpp is not None:
            _need(explicit_vpp == vpp, f"--virtual-pipeline-model-parallel-size {explicit_vpp} disagrees with "
                  f"--num-layers {args.num_layers} / --pipeline-model-parallel-size {pp} / "
                  f"--num-layers-per-virtual-pipeline-stage {per_layer_chunk} = {vpp}; give only one")
    elif args.pipeline_model_parallel_layout is not None:  # the layout's stage count fixes the virtual stages
        from mindtron.legacy_model.pipeline_layout import layout_virtual_size

        vpp = layout_virtual_size(args.pipeline_model_parallel_layout, pp)
        if explicit_vpp is not None:
            _need(explicit_vpp == (vpp or 1), f"--virtual-pipeline-model-parallel-size {explicit_vpp} disagrees with "
                  f"the {vpp or 1} virtual stages per pipeline rank of --pipeline-model-parallel-layout")
    elif args.num_virtual_stages_per_pipeline_rank is not None:
        vpp = args.num_virtual_stages_per_pipeline_rank
        if explicit_vpp is not None:
            _need(explicit_vpp == vpp, "--virtual-pipeline-model-parallel-size and "
                  "--num-virtual-stages-per-pipeline-rank disagree; give only one")
    elif explicit_vpp is not None:
        # mindtron's direct form (document 002): model chunks per pipeline rank.
        _need(explicit_vpp >= 1, "--virtual-pipeline-model-parallel-size must be at least 1")
        vpp = explicit_vpp
        if args.num_layer_list is None and explicit_vpp > 1:
            _need(num_layers % (pp * vpp) == 0, f"--num-layers {num_layers} cannot be split into "
                  f"--pipeline-model-parallel-size {pp} x --virtual-pipeline-model-parallel-size {vpp} chunks")
            args.num_layers_per_virtual_pipeline_stage = num_layers // (pp * vpp)
    elif args.num_layer_list is None and args.decoder_first_pipeline_num_layers is None and \
            args.decoder_last_pipeline_num_layers is None:
        _need(num_layers % pp == 0, f"--num-layers {args.num_layers} should be divisible by "
              f"--pipeline-model-parallel-size {pp} (or give --num-layer-list for uneven stages)")
    if vpp == 1:
        vpp = None
    args.virtual_pipeline_model_parallel_size = vpp
    if vpp is not None:
        if args.overlap_p2p_comm:
            _need(pp > 1, "the interleaved schedule (virtual pipeline stages) needs "
                  "--pipeline-model-parallel-size > 1")
        else:
            _need(pp > 2, "the interleaved schedule with --no-overlap-p2p-communication needs "
                  "--pipeline-model-parallel-size > 2")
    else:
        # Megatron: p2p overlap and aligned param gather exist only with the interleaved schedule.
        args.overlap_p2p_comm = False
        args.align_param_gather = False
    if args.num_layer_list is not None:
        _check_layer_list(args.num_layer_list, args.num_layers, pp, vpp or 1)


def _check_layer_list(layer_list: list, num_layers: int, pp: int, chunks: int) -> None:
    nested = layer_list if layer_list and isinstance(layer_list[0], list) else [layer_list]
    shape_ok = len(nested) == chunks and all(len(c) == pp for c in nested)
    _need(shape_ok, f"--num-layer-list {layer_list} must hold {pp} counts (one per pipeline stage)" +
          (f" in each of {chunks} lists (one per virtual stage)" if chunks > 1 else ""))
    flat = [n for c in nested for n in c]
    _need(all(isinstance(n, int) and n >= 0 for n in flat) and sum(flat) == num_layers,
          f"--num-layer-list {layer_list} must be non-negative counts summing to --num-layers {num_layers}")


def _validate_model(args: argparse.Namespace, user: set) -> None:
    tp = args.tensor_model_parallel_size
    # Activation: --hidden-act, or Megatron's switches.
    _need(not (args.swiglu and args.squared_relu), "--swiglu and --squared-relu exclude each other")
    _need(not (args.quick_geglu and (args.swiglu or args.squared_relu)),
          "--quick-geglu excludes --swiglu and --squared-relu")
    derived = "swiglu" if args.swiglu else "squared_relu" if args.squared_relu else \
        "quick_geglu" if args.quick_geglu else "gelu_tanh" if args.openai_gelu else "gelu"
    if args.hidden_act is None:
        args.hidden_act = derived
    elif derived != "gelu" and args.hidden_act != derived:
        raise ValueError(f"--hidden-act {args.hidden_act} contradicts the activation switch that selects "
                         f"{derived!r} (--swiglu/--squared-relu/--quick-geglu/--openai-gelu); give one of them")
    if args.ffn_hidden_size is None:
        # Megatron: SwiGLU's two input projections keep the parameter count near 4h, rounded to 64.
        args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64 if args.hidden_act == "swiglu" \
            else 4 * args.hidden_size
    _need(args.ffn_hidden_size > 0, f"--ffn-hidden-size must be positive, got {args.ffn_hidden_size}")
    if args.kv_channels is None:
        _need(args.hidden_size % args.num_attention_heads == 0,
              f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
              f"{args.num_attention_heads}; change one or set --kv-channels")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    _need(args.num_attention_heads % tp == 0, f"--num-attention-heads {args.num_attention_heads} is not "
          f"divisible by --tensor-model-parallel-size {tp}")
    if args.group_query_attention:
        groups = args.num_query_groups
        _need(groups is not None and groups >= 1, "--group-query-attention needs --num-query-groups >= 1")
        _need(args.num_attention_heads % groups == 0, f"--num-query-groups {groups} must divide "
              f"--num-attention-heads {args.num_attention_heads}")
        _need(groups % tp == 0, f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size "
              f"{tp}; each tensor-parallel rank needs whole key/value groups")
    _need(args.ffn_hidden_size % tp == 0, f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
          f"--tensor-model-parallel-size {tp}")

    # Biases (Megatron keeps add_qkv_bias in sync with add_bias_linear).
    if not args.add_bias_linear:
        args.bias_gelu_fusion = False
    else:
        args.add_qkv_bias = True
        args.add_dense_bias = True

    # Positions.
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.position_embedding_type != "rope":
        args.apply_rope_fusion = False
    elif args.use_fused_rope:
        args.apply_rope_fusion = True
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        raise ValueError("--no-position-embedding is deprecated: use --position-embedding-type none")
    if args.position_embedding_type == "mrope":
        _need(args.mrope_section is not None, "--position-embedding-type mrope needs --mrope-section")

    # Vocabulary: padded like Megatron once a size is known (the tokenizer may set it later).
    if args.padded_vocab_size is None and args.vocab_size is not None:
        # NullTokenizer's ids are 0..N-1 plus EOD = N, so its vocabulary is one larger than --vocab-size.
        tokens = args.vocab_size + (1 if args.tokenizer_type == "NullTokenizer" else 0)
        args.padded_vocab_size = pad_vocab_size(tokens, args.make_vocab_size_divisible_by, tp)
    if args.padded_vocab_size is not None:
        _need(args.padded_vocab_size % tp == 0, f"--padded-vocab-size {args.padded_vocab_size} is not divisible "
              f"by --tensor-model-parallel-size {tp}")

    # Sequence parallelism splits activations over tensor-parallel ranks: meaningless without them.
    if tp == 1 and args.sequence_parallel:
        logger.warning("disabling --sequence-parallel because --tensor-model-parallel-size is 1")
        args.sequence_parallel = False
    if args.sequence_parallel:
        _need(args.seq_length % tp == 0, f"--sequence-parallel splits --seq-length {args.seq_length} over "
              f"--tensor-model-parallel-size {tp}, which must divide it")

    # Recompute.
    if args.recompute_granularity == "selective":
        _need(args.recompute_method is None, "--recompute-method is not supported with "
              "--recompute-granularity selective; drop one")
    if args.recompute_granularity == "full":
        _need(args.recompute_method is not None, "--recompute-granularity full needs --recompute-method uniform "
              "or block")
    if args.recompute_method == "block":
        _need(args.recompute_num_layers is not None, "--recompute-method block needs --recompute-num-layers")

    if args.transformer_impl == "transformer_engine" and "transformer_impl" in user:
        _warn_once("--transformer-impl=transformer_engine", "--transformer-impl transformer_engine is not "
                   "available in mindtron; the local (Megatron legacy) layers are used")
    if args.num_experts == 0:
        args.num_experts = None
    if args.expert_model_parallel_size > 1:
        _need(args.num_experts is not None, "--expert-model-parallel-size > 1 needs --num-experts")
        _need(args.num_experts % args.expert_model_parallel_size == 0, f"--num-experts {args.num_experts} "
              f"should be a multiple of --expert-model-parallel-size {args.expert_model_parallel_size}")
        _need(not args.fp16, "expert parallelism is not supported with --fp16; use --bf16")
    if args.apply_query_key_layer_scaling:
        args.attention_softmax_in_fp32 = True


def _validate_model_options(args: argparse.Namespace, user: set) -> None:
    """Issue 14: refuse what cannot be done here (REFUSED_FLAGS), derive what Megatron derives."""
    for dest, (refused, reason) in REFUSED_FLAGS.items():
        value = getattr(args, dest, None)
        if refused(value):
            shown = "" if value is True else f" {value}"
            raise ValueError(f"{_flag_label(dest)}{shown} is not available in mindtron: {reason}. Remove it from the "
                             "command line (or the --yaml-cfg file)")
    if getattr(args, "no_weight_decay_cond_type", None) == "apply_wd_to_qk_layernorm":
        args.apply_wd_to_qk_layernorm = True
    if args.data_parallel_random_init and (args.hidden_dropout > 0 or args.attention_dropout > 0):
        # Megatron seeds each data-parallel rank differently and broadcasts rank 0's weights: only the
        # dropout masks change. mindtron's masks come from one stream per tensor-parallel rank.
        raise ValueError("--data-parallel-random-init with dropout is not available in mindtron: it would draw "
                         "different dropout masks on each data-parallel rank (the weights are the same anyway, "
                         "initialised from --seed and each parameter's name); drop the flag or set "
                         "--hidden-dropout 0 --attention-dropout 0")
    if args.swiglu and args.bias_swiglu_fusion and args.activation_func_clamp_value is not None:
        _warn_once("--activation-func-clamp-value", "--activation-func-clamp-value has no effect with --swiglu and "
                   "the fused bias-SwiGLU (Megatron's default): pass --no-bias-swiglu-fusion to clamp")


def _model_option_values(args: argparse.Namespace, kw: Dict[str, Any]) -> None:
    """Issue 14: model_config values that are not plain copies of a flag (updates `kw` in place)."""
    for field in ("yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                  "yarn_correction_range_round_to_int"):
        if kw.get(field) is None:  # Megatron's defaults (4096, 32, 1, True) apply when the flag is left out
            kw.pop(field, None)
    if kw.get("window_size") is not None:
        kw["window_size"] = tuple(kw["window_size"])


def _validate_precision(args: argparse.Namespace, user: set) -> None:
    _need(not (args.fp16 and args.bf16), "--fp16 and --bf16 exclude each other; give one")
    from_switch = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    # Megatron derives params_dtype from --fp16/--bf16; mindtron also takes it (and compute/embedding
    # dtypes) directly, as document 002 does.
    args.params_dtype = _DTYPE_LONG[args.params_dtype] if args.params_dtype else from_switch
    args.compute_dtype = _DTYPE_LONG[args.compute_dtype] if args.compute_dtype else from_switch
    args.embedding_dtype = _DTYPE_LONG[args.embedding_dtype] if args.embedding_dtype else args.params_dtype
    if args.fp16 and not args.loss_scale:
        # dynamic loss scaling reads NaNs as overflows, so Megatron stops treating them as errors
        args.check_for_nan_in_loss_and_grad = False
    if args.bf16:
        if args.grad_reduce_in_bf16:
            args.accumulate_allreduce_grads_in_fp32 = False
        elif not args.accumulate_allreduce_grads_in_fp32 and args.main_grads_dtype == "fp32":
            args.accumulate_allreduce_grads_in_fp32 = True
    _need(not args.fp16_lm_cross_entropy or args.fp16, "--fp16-lm-cross-entropy needs --fp16")
    _need(not args.fp32_residual_connection or args.fp16 or args.bf16,
          "--fp32-residual-connection needs --fp16 or --bf16")
    # Loss scaling: document 000's names feed the same fields as Megatron's.
    if args.loss_scale_value is None:
        args.loss_scale_value = args.initial_loss_scale
    if args.scale_window is None:
        args.scale_window = int(args.loss_scale_window)
    _need(args.min_scale_window <= args.max_scale_window, f"--min-scale-window {args.min_scale_window} exceeds "
          f"--max-scale-window {args.max_scale_window}")
    # Clipping: Megatron clips at --clip-grad (default 1.0, 0 disables); documents 000/001 name the same
    # switch use_clip_grad/max_grad_norm. An explicit use_clip_grad: false turns clipping off.
    if args.max_grad_norm is not None:
        args.clip_grad = args.max_grad_norm
    if "use_clip_grad" in user and not args.use_clip_grad:
        args.clip_grad = 0.0
    args.use_clip_grad = bool(args.use_clip_grad or args.clip_grad > 0)
    if args.use_clip_grad:
        _need(args.clip_grad > 0, "--use-clip-grad needs a positive --clip-grad (or --max-grad-norm)")
    args.max_grad_norm = args.clip_grad if args.clip_grad > 0 else 1.0
    if args.bucket_size is None and args.ddp_bucket_size is not None:
        args.bucket_size = args.ddp_bucket_size


def _validate_schedule(args: argparse.Namespace, user: set) -> None:
    if args.train_iters:
        _need(args.train_samples is None, "give --train-iters or --train-samples, not both "
              "(expected iteration-based training)")
        _need(args.lr_decay_samples is None, "--lr-decay-samples needs sample-based training (--train-samples); "
              "use --lr-decay-iters with --train-iters")
        _need(args.lr_warmup_samples == 0, "--lr-warmup-samples needs sample-based training (--train-samples); "
              "use --lr-warmup-iters or --lr-warmup-fraction with --train-iters")
        _need(args.rampup_batch_size is None, "--rampup-batch-size needs sample-based training "
              "(--train-samples)")
        if args.lr_warmup_fraction is not None:
            _need(args.lr_warmup_iters == 0, "can only specify one of --lr-warmup-fraction and --lr-warmup-iters")
    if args.train_samples:
        _need(args.train_iters is None, "give --train-iters or --train-samples, not both "
              "(expected sample-based training)")
        _need(args.lr_decay_iters is None, "--lr-decay-iters needs iteration-based training (--train-iters); "
              "use --lr-decay-samples with --train-samples")
        _need(args.lr_warmup_iters == 0, "--lr-warmup-iters needs iteration-based training (--train-iters); "
              "use --lr-warmup-samples or --lr-warmup-fraction with --train-samples")
        if args.lr_warmup_fraction is not None:
            _need(args.lr_warmup_samples == 0, "can only specify one of --lr-warmup-fraction and "
                  "--lr-warmup-samples")
    if args.lr_warmup_fraction is not None:
        _need(0.0 <= args.lr_warmup_fraction <= 1.0, f"--lr-warmup-fraction must be in [0, 1], got "
              f"{args.lr_warmup_fraction}")
    if args.lr is not None:
        _need(args.min_lr <= args.lr, f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    if args.weight_decay_incr_style == "constant":
        for dest in ("start_weight_decay", "end_weight_decay"):
            value = getattr(args, dest)
            _need(value is None or (dest not in user and value == args.weight_decay),
                  f"{_flag_label(dest)} needs --weight-decay-incr-style linear or cosine")
        args.start_weight_decay = args.weight_decay
        args.end_weight_decay = args.weight_decay
    else:
        _need(args.start_weight_decay is not None and args.end_weight_decay is not None,
              f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay and "
              "--end-weight-decay")
    if args.save is not None:
        _need(args.save_interval is not None and args.save_interval > 0,
              "--save needs a positive --save-interval (iterations between checkpoints)")
        if args.save_retain_interval is not None:
            _need(args.save_retain_interval > 0 and args.save_retain_interval % args.save_interval == 0,
                  "--save-retain-interval must be a positive multiple of --save-interval")
    if args.optimizer not in ("adam", "sgd"):
        raise ValueError(f"--optimizer {args.optimizer} is not available in mindtron; use adam or sgd")


def _validate_misc(args: argparse.Namespace, user: set) -> None:
    if args.overlap_param_gather:
        _need(args.use_distributed_optimizer or args.use_megatron_fsdp,
              "--overlap-param-gather needs --use-distributed-optimizer")
        _need(args.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce")
    if args.overlap_param_gather_with_optimizer_step:
        _need(args.use_distributed_optimizer and args.overlap_param_gather and
              args.virtual_pipeline_model_parallel_size is not None,
              "--overlap-param-gather-with-optimizer-step needs --use-distributed-optimizer, "
              "--overlap-param-gather and virtual pipeline stages")
    if args.deterministic_mode:
        _need(not args.use_flash_attn, "flash attention (--use-flash-attn) cannot be used with --deterministic-mode")
    if args.load_main_params_from_ckpt:
        _need(bool(args.no_load_optim), "--load-main-params-from-ckpt must be used with --no-load-optim")
    if args.context_parallel_algo == "hybrid":
        _need(args.ulysses_degree_in_cp is not None, "--context-parallel-algo hybrid needs --ulysses-degree-in-cp")
    if args.ulysses_degree_in_cp is not None:
        _need(args.ulysses_degree_in_cp >= 1 and args.context_parallel_size % args.ulysses_degree_in_cp == 0,
              f"--ulysses-degree-in-cp {args.ulysses_degree_in_cp} must divide --context-parallel-size "
              f"{args.context_parallel_size}")
    if args.ckpt_format != "safetensors" and "ckpt_format" in user:
        _warn_once("--ckpt-format", f"--ckpt-format {args.ckpt_format} is not available in mindtron; "
                   "checkpoints are saved as safetensors")
    if args.cpu_offloading_num_layers > 0:
        args.cpu_offloading = True
    if args.dataloader_type is None:
        args.dataloader_type = "single"
    # Megatron's run counters start here.
    args.consumed_train_samples = 0
    args.skipped_train_samples = 0
    args.consumed_valid_samples = 0
    args.variable_seq_lengths = False


# ---------------------------------------------------------------------------------------------------------
# Arguments -> configs
# ---------------------------------------------------------------------------------------------------------
def init_configs_from_args(args: Optional[argparse.Namespace] = None) -> AllConfig:
    """The five configs of document 002 from parsed (and validated) Megatron arguments; `get_args()` when
    `args` is None. model_config is a TransformerConfig (its own checks run here too)."""
    args = get_args() if args is None else args
    if not hasattr(args, "data_parallel_size"):
        validate_args(args)
    return AllConfig(model_config=_model_config(args), training_config=_training_config(args),
                     dataset_config=_dataset_config(args), optimizer_config=_optimizer_config(args),
                     parallel_config=_parallel_config(args))


def _simple_fields(args: argparse.Namespace, section: str, skip: Iterable[str] = ()) -> Dict[str, Any]:
    # One-to-one rows of CONFIG_MAP for `section`; the caller overrides the derived ones.
    skip = set(skip)
    out: Dict[str, Any] = {}
    for dest, target in CONFIG_MAP:
        sec, field = target.split(".", 1)
        if sec == section and "." not in field and field not in skip and field not in out:
            out[field] = getattr(args, dest)
    return out


def _model_config(args: argparse.Namespace) -> TransformerConfig:
    tp = args.tensor_model_parallel_size
    vocab = args.padded_vocab_size
    if vocab is None:
        vocab = pad_vocab_size(_GPT2_VOCAB, args.make_vocab_size_divisible_by, tp)
        logger.info("no vocabulary size known yet (--vocab-size/--padded-vocab-size); using GPT-2's %d padded "
                    "to %d", _GPT2_VOCAB, vocab)
    kw = _simple_fields(args, "model_config", skip=("vocab_size",))
    kw.update(
        vocab_size=vocab,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        rotary_base=float(args.rotary_base),
        fa_config={"pre_tokens": args.pre_tockens, "next_tokens": args.next_tockens,
                   "input_layout": args.shape_order},
        transformer_impl="local",  # the only implementation here; Megatron's default names Transformer Engine
        qkv_has_bias=bool(args.add_qkv_bias or args.add_bias_linear),
        out_proj_has_bias=bool(args.add_dense_bias or args.add_bias_linear),
        apply_rope_fusion=bool(args.apply_rope_fusion or args.use_fused_rope),
        embedding_init_dtype=args.embedding_dtype,
    )
    _model_option_values(args, kw)
    return TransformerConfig(**kw)


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    kw = _simple_fields(args, "training_config")
    train_iters = args.train_iters
    if not train_iters and args.train_samples:
        train_iters = args.train_samples // args.global_batch_size  # Megatron's update_train_iters
    kw.update(
        training_iters=int(train_iters or 0),
        exit_duration_in_mins=None if args.exit_duration_in_mins is None else float(args.exit_duration_in_mins),
        loss_scale_value=float(args.loss_scale_value if args.loss_scale_value is not None
                               else args.initial_loss_scale),
        loss_scale_window=int(args.scale_window if args.scale_window is not None else args.loss_scale_window),
        bucket_size=args.bucket_size if args.bucket_size is not None else args.ddp_bucket_size,
        ckpt_format="safetensors",  # mindtron's format, whatever Megatron format was named
        use_clip_grad=bool(args.use_clip_grad),
        max_grad_norm=float(args.max_grad_norm if args.max_grad_norm is not None else args.clip_grad or 1.0),
        gradient_accumulation_steps=int(args.gradient_accumulation_steps or 1),
    )
    for name in ("no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng"):
        kw[name] = bool(kw[name])  # Megatron's default for these is None
    return TrainingConfig(**kw)


def _dataset_config(args: argparse.Namespace) -> DatasetConfig:
    kw = _simple_fields(args, "dataset_config")
    if kw.get("eos_token_id") is None:
        from mindtron.data.tokenizers import get_tokenizer
        tokenizer = get_tokenizer()
        if tokenizer is not None:
            kw["eos_token_id"] = int(tokenizer.eod)  # batches mask and reset at the tokenizer's EOD
    kw["micro_batch_num"] = int(args.micro_batch_num or 1)
    return DatasetConfig(**kw)


def _optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    kw = _simple_fields(args, "optimizer_config", skip=("betas",))
    kw["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
    kw["clip_grad"] = float(args.clip_grad if args.use_clip_grad else 0.0)
    return OptimizerConfig(**kw)


def _parallel_config(args: argparse.Namespace) -> ParallelConfig:
    kw = _simple_fields(args, "parallel_config", skip=("order",))
    kw["virtual_pipeline_model_parallel_size"] = args.virtual_pipeline_model_parallel_size
    kw["order"] = "tp-cp-ep-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp"
    return ParallelConfig(**kw)


# ---------------------------------------------------------------------------------------------------------
# Global arguments (Megatron's global_vars)
# ---------------------------------------------------------------------------------------------------------
_GLOBAL_ARGS: Optional[argparse.Namespace] = None


def set_args(args: Optional[argparse.Namespace]) -> None:
    """Make `args` the process's arguments for get_args() (None forgets them)."""
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args


def get_args() -> argparse.Namespace:
    """The arguments set by set_args() / initialize_megatron(); RuntimeError before that."""
    if _GLOBAL_ARGS is None:
        raise RuntimeError("arguments are not parsed yet: call initialize_megatron(), or parse_args() and "
                           "set_args(), first")
    return _GLOBAL_ARGS
