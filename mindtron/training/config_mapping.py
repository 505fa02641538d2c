"""Parsed Megatron arguments -> mindtron's typed configs (document 002's five configs).

`CONFIG_MAP` lists where each implemented flag lands, as (dest on the parsed arguments, "section.field");
`init_configs_from_args(args)` builds the AllConfig from validated arguments. The YAML loader reads the same
table backwards (a config field's YAML value sets the first flag that feeds it).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Iterable, Optional, Tuple

from mindtron.legacy_model.config import TransformerConfig, pad_vocab_size
from mindtron.parallel_core.moe.config import MoEConfig
from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig

__all__ = ["CONFIG_MAP", "SECTIONS", "init_configs_from_args", "moe_config_from_args", "GPT2_VOCAB"]

logger = logging.getLogger(__name__)

SECTIONS = ("model_config", "training_config", "dataset_config", "optimizer_config", "parallel_config")
GPT2_VOCAB = 50257  # GPT-2 BPE, Megatron's usual tokenizer, when no vocabulary size is known yet

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
    ("layernorm_epsilon", "model_config.norm_epsilon"),  # --norm-epsilon (Megatron's dest)
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
    # (on by default; --no-jit-layers turns it off: _model_config combines the two)
    ("enable_cuda_graph", "model_config.jit_layers"),
    ("no_jit_layers", "model_config.jit_layers"),
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
    ("rampup_batch_size", "training_config.rampup_batch_size"),
    ("step_batch_size_schedule", "training_config.step_batch_size_schedule"),
    ("decrease_batch_size_if_needed", "training_config.decrease_batch_size_if_needed"),
    ("iterations_to_skip", "training_config.iterations_to_skip"),
    ("exit_on_missing_checkpoint", "training_config.exit_on_missing_checkpoint"),
    # --- issue 18: watching and operating a run (TensorBoard/W&B, timers, memory, profiler options, exits).
    # training_config fields; used by training/run_monitor.py, profiling.py, writers.py, signal_handler.py.
    ("profile_ranks", "training_config.profile_ranks"),
    ("profile_level", "training_config.profile_level"),
    ("profile_with_stack", "training_config.profile_with_stack"),
    ("profile_memory", "training_config.profile_memory"),
    ("profile_framework", "training_config.profile_framework"),
    ("profile_communication", "training_config.profile_communication"),
    ("profile_parallel_strategy", "training_config.profile_parallel_strategy"),
    ("profile_aicore_metrics", "training_config.profile_aicore_metrics"),
    ("profile_l2_cache", "training_config.profile_l2_cache"),
    ("profile_hbm_ddr", "training_config.profile_hbm_ddr"),
    ("profile_pcie", "training_config.profile_pcie"),
    ("profile_data_process", "training_config.profile_data_process"),
    ("profile_data_simplification", "training_config.profile_data_simplification"),
    ("profile_op_time", "training_config.profile_op_time"),
    ("profile_offline_analyse", "training_config.profile_offline_analyse"),
    ("profile_dynamic_profiler_config_path", "training_config.profile_dynamic_profiler_config_path"),
    ("tensorboard_dir", "training_config.tensorboard_dir"),
    ("tensorboard_log_interval", "training_config.tensorboard_log_interval"),
    ("tensorboard_queue_size", "training_config.tensorboard_queue_size"),
    ("log_timers_to_tensorboard", "training_config.log_timers_to_tensorboard"),
    ("log_validation_ppl_to_tensorboard", "training_config.log_validation_ppl_to_tensorboard"),
    ("log_memory_to_tensorboard", "training_config.log_memory_to_tensorboard"),
    ("log_loss_scale_to_tensorboard", "training_config.log_loss_scale_to_tensorboard"),
    ("log_world_size_to_tensorboard", "training_config.log_world_size_to_tensorboard"),
    ("log_num_zeros_in_grad", "training_config.log_num_zeros_in_grad"),
    ("log_params_norm", "training_config.log_params_norm"),
    ("log_throughput", "training_config.log_throughput"),
    ("log_memory_interval", "training_config.log_memory_interval"),
    ("timing_log_level", "training_config.timing_log_level"),
    ("timing_log_option", "training_config.timing_log_option"),
    ("barrier_with_L1_time", "training_config.barrier_with_L1_time"),
    ("wandb_project", "training_config.wandb_project"),
    ("wandb_entity", "training_config.wandb_entity"),
    ("wandb_exp_name", "training_config.wandb_exp_name"),
    ("wandb_save_dir", "training_config.wandb_save_dir"),
    ("exit_signal_handler", "training_config.exit_signal_handler"),
    ("exit_signal", "training_config.exit_signal"),
    ("exit_on_missing_checkpoint", "training_config.exit_on_missing_checkpoint"),
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
    ("dataloader_type", "dataset_config.dataloader_type"),
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
    ("context_parallel_algo", "model_config.context_parallel_algo"),
    ("ulysses_degree_in_cp", "model_config.ulysses_degree_in_cp"),
    ("cp_comm_type", "model_config.cp_comm_type"),
    ("hierarchical_context_parallel_sizes", "model_config.hierarchical_context_parallel_sizes"),
    ("expert_model_parallel_size", "parallel_config.expert_model_parallel_size"),
    ("expert_tensor_parallel_size", "parallel_config.expert_tensor_parallel_size"),
    ("sequence_parallel", "parallel_config.sequence_parallel"),
    ("use_tp_pp_dp_mapping", "parallel_config.order"),
    ("recompute", "parallel_config.recompute"),
    ("select_recompute", "parallel_config.select_recompute"),
    ("select_comm_recompute", "parallel_config.select_comm_recompute"),
    # --- core_r0.19.0 flags that change the model maths or the optimizer (dests as in the table) ---
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
    # MLP (--quick-geglu selects hidden_act "quick_geglu" in validate_arguments)
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
    # Mixture of Experts: model_config.moe_config (parallel_core.moe.MoEConfig, fields named as the flags)
    *((dest, f"model_config.moe_config.{dest}") for dest in (
        "num_experts", "moe_ffn_hidden_size", "moe_layer_freq", "first_k_dense_replace", "moe_router_topk",
        "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
        "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
        "moe_router_bias_update_rate", "moe_router_dtype", "moe_router_force_load_balancing",
        "moe_input_jitter_eps", "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
        "moe_expert_capacity_factor", "moe_token_drop_policy", "moe_pad_expert_input_to_capacity",
        "moe_token_dispatcher_type", "moe_grouped_gemm", "enable_gmm_safe_tokens", "moe_apply_probs_on_input",
        "moe_shared_expert_intermediate_size", "moe_shared_expert_overlap", "moe_shared_expert_gate",
        "moe_layer_recompute", "moe_per_layer_logging", "moe_router_force_biased",
        # documents 000/001's MoE tools
        "save_token_distribution", "callback_moe_droprate", "enable_cold_hot_expert", "hot_expert_num",
        "cold_token_percent", "moe_module_name", "hot_expert_update_step")),
    ("callbacks", "training_config.callbacks"),
    ("token_distribution_dir", "training_config.token_distribution_dir"),
    ("token_distribution_interval", "training_config.token_distribution_interval"),
    ("log_token_distribution", "training_config.log_token_distribution"),
)


def init_configs_from_args(args: Optional[argparse.Namespace] = None) -> AllConfig:
    """The five configs of document 002 from parsed (and validated) Megatron arguments; `get_args()` when
    `args` is None. model_config is a TransformerConfig (its own checks run here too)."""
    if args is None:
        from mindtron.training.arguments import get_args
        args = get_args()
    if not hasattr(args, "data_parallel_size"):
        from mindtron.training.validate_arguments import validate_args
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
        vocab = pad_vocab_size(GPT2_VOCAB, args.make_vocab_size_divisible_by, tp)
        logger.info("no vocabulary size known yet (--vocab-size/--padded-vocab-size); using GPT-2's %d padded "
                    "to %d", GPT2_VOCAB, vocab)
    kw = _simple_fields(args, "model_config", skip=("vocab_size",))
    if args.enable_cuda_graph and args.no_jit_layers:
        raise ValueError("--enable-cuda-graph compiles the transformer layers and --no-jit-layers runs them "
                         "eagerly: give one of them (compiled layers are the default)")
    kw.update(
        jit_layers=not args.no_jit_layers,
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
        moe_config=moe_config_from_args(args),
    )
    for field in ("yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                  "yarn_correction_range_round_to_int"):
        if kw.get(field) is None:  # Megatron's defaults (4096, 32, 1, True) apply when the flag is left out
            kw.pop(field, None)
    if kw.get("window_size") is not None:
        kw["window_size"] = tuple(kw["window_size"])
    return TransformerConfig(**kw)


def moe_config_from_args(args: argparse.Namespace) -> MoEConfig:
    """The MoE rows of CONFIG_MAP as a MoEConfig (Megatron's list-valued flags of one entry become scalars)."""
    kw = {}
    for dest, target in CONFIG_MAP:
        if target.startswith("model_config.moe_config."):
            kw[target.rsplit(".", 1)[1]] = getattr(args, dest)
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        if isinstance(kw[name], (list, tuple)):
            kw[name] = kw[name][0] if len(kw[name]) == 1 else list(kw[name])
    return MoEConfig(**kw)


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    kw = _simple_fields(args, "training_config")
    train_iters = args.train_iters
    if not train_iters and args.train_samples:
        from mindtron.training.num_microbatches import build_batch_schedule, train_iters_for_samples
        schedule = build_batch_schedule(args.global_batch_size, args.micro_batch_size, args.data_parallel_size,
                                        args.rampup_batch_size, args.step_batch_size_schedule, args.seq_length,
                                        args.decrease_batch_size_if_needed)
        train_iters = train_iters_for_samples(schedule, args.train_samples)  # Megatron's update_train_iters
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
        rampup_batch_size=list(args.rampup_batch_size) if args.rampup_batch_size is not None else None,
        iterations_to_skip=list(args.iterations_to_skip or []),
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
