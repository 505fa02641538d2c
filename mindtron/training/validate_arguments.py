"""Megatron's validate_args for mindtron: derived values (data-parallel size, global batch, batch-size
schedule, virtual pipeline size, ffn size, dtypes, padded vocabulary, ...) and the checks of invalid
combinations, each a ValueError that names the flag and the fix. Nothing here touches a device or a process
group: the world size comes from msrun's MS_WORKER_NUM (or the `world_size` argument).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Optional

from mindtron.legacy_model.config import pad_vocab_size
from mindtron.training import megatron_flags as mf
from mindtron.training.flag_policy import warn_once
from mindtron.training.num_microbatches import build_batch_schedule

__all__ = ["validate_args", "apply_defaults", "flag_label"]

logger = logging.getLogger(__name__)


def flag_label(dest: str) -> str:
    """The option a user writes for `dest` (e.g. "layernorm_epsilon" -> "--norm-epsilon")."""
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


_DTYPE_LONG = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}


def apply_defaults(args: argparse.Namespace, defaults: Dict[str, Any]) -> None:
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
        _need(getattr(args, dest) is None, f"{flag_label(dest)} is no longer valid; use {use} instead")
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
        _need(value >= 1, f"{flag_label(dest)} must be at least 1, got {value}")
    model_size = tp * pp * cp
    _need(args.world_size % model_size == 0,
          f"world size ({args.world_size}) is not divisible by --tensor-model-parallel-size {tp} x "
          f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp} = {model_size}; change the "
          "parallel sizes or the number of workers (msrun --worker_num)")
    args.transformer_pipeline_model_parallel_size = pp
    args.data_parallel_size = args.world_size // model_size
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = tp

    apply_defaults(args, defaults or {})

    _read_data_args_files(args)

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
    _need(args.micro_batch_size is not None, "--micro-batch-size is required (samples per micro-batch per "
          "data-parallel rank)")
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _need(getattr(args, dest) is not None,
              f"{flag_label(dest)} is required: give it on the command line or in the --yaml-cfg file")
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        _need(getattr(args, dest) > 0, f"{flag_label(dest)} must be positive, got {getattr(args, dest)}")
    if args.max_position_embeddings is None:
        # Megatron requires it; mindtron sizes the position table from --seq-length when it is left out.
        args.max_position_embeddings = args.seq_length
    _need(args.max_position_embeddings >= args.seq_length,
          f"max_position_embeddings ({args.max_position_embeddings}) must be greater than or equal to "
          f"seq_length ({args.seq_length}): raise --max-position-embeddings or lower --seq-length")
    if args.decoder_seq_length is not None:
        _need(args.max_position_embeddings >= args.decoder_seq_length,
              "--decoder-seq-length must not exceed --max-position-embeddings")
    _validate_context_parallel(args, user)

    _validate_batch(args, user)
    _validate_model_options(args)
    _validate_pipeline(args, user)
    _validate_model(args, user)
    _validate_precision(args, user)
    _validate_schedule(args, user)
    _validate_misc(args, user)
    return args


def _read_data_args_files(args: argparse.Namespace) -> None:
    # Megatron reads --data-args-path (the --data-path text) and --per-split-data-args-path (JSON with
    # train/valid/test) when the datasets are built; here they become the flags they stand for.
    _need(args.data_path is None or args.data_args_path is None, "give --data-path or --data-args-path, not both")
    if args.data_args_path is not None:
        if not os.path.isfile(args.data_args_path):
            raise FileNotFoundError(f"--data-args-path {args.data_args_path}: no such file")
        with open(args.data_args_path, encoding="utf-8") as handle:
            args.data_path = handle.read().split()
        args.data_args_path = None
    if args.per_split_data_args_path is not None:
        _need(not any([args.train_data_path, args.valid_data_path, args.test_data_path]),
              "give --per-split-data-args-path or --train/--valid/--test-data-path, not both")
        path = args.per_split_data_args_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--per-split-data-args-path {path}: no such file")
        with open(path, encoding="utf-8") as handle:
            try:
                splits = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"--per-split-data-args-path {path}: not JSON ({err})") from None
        missing = [k for k in ("train", "valid", "test") if not isinstance(splits, dict) or k not in splits]
        _need(not missing, f"--per-split-data-args-path {path}: needs the keys train, valid and test "
              f"(missing {missing})")
        for split in ("train", "valid", "test"):
            value = splits[split]
            setattr(args, f"{split}_data_path", value.split() if isinstance(value, str) else list(value))
        args.per_split_data_args_path = None
    if args.data_path is not None and args.split is None:
        logger.warning("--data-path without --split: using Megatron's legacy default split 969, 30, 1")
        args.split = "969, 30, 1"
    _need(bool(args.mock_data) + bool(args.data_path) +
          any([args.train_data_path, args.valid_data_path, args.test_data_path]) <= 1,
          "give a single data source: --mock-data, --data-path, or --train/--valid/--test-data-path")


def _validate_context_parallel(args, user) -> None:
    """--context-parallel-size with --cp-comm-type (or document 002's context_parallel_algo and
    ulysses_degree_in_cp) and --hierarchical-context-parallel-sizes: checked here, before any process group."""
    from mindtron.parallel_core.context_parallel import validate_context_parallel

    if "cp_comm_type" not in user:
        args.cp_comm_type = None  # Megatron's default ["p2p"]; document 002's context_parallel_algo decides
    if args.context_parallel_algo == "hybrid" and args.cp_comm_type is None:
        _need(args.ulysses_degree_in_cp is not None or args.hierarchical_context_parallel_sizes,
              "--context-parallel-algo hybrid (hybrid_cp_algo) needs --ulysses-degree-in-cp")
    groups = args.num_query_groups if args.group_query_attention and args.num_query_groups else None
    validate_context_parallel(args.context_parallel_size, args.tensor_model_parallel_size, args.seq_length,
                              args.num_attention_heads, groups, args.num_layers, args.cp_comm_type,
                              args.context_parallel_algo, args.hierarchical_context_parallel_sizes,
                              args.ulysses_degree_in_cp, args.sequence_parallel)


def _validate_batch(args: argparse.Namespace, user: set) -> None:
    _need(args.micro_batch_size is not None, "--micro-batch-size is required (samples per micro-batch per "
          "data-parallel rank)")
    _need(args.micro_batch_size > 0, f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    dp, micro = args.data_parallel_size, args.micro_batch_size
    accum = [(d, getattr(args, d)) for d in ("gradient_accumulation_steps", "micro_batch_num")
             if getattr(args, d) is not None]
    for dest, value in accum:
        _need(value >= 1, f"{flag_label(dest)} must be at least 1, got {value}")
    if len({v for _, v in accum}) > 1:
        raise ValueError("--gradient-accumulation-steps and --micro-batch-num disagree; give one of them")
    explicit_global = "global_batch_size" in user or getattr(args, "_global_batch_size_given", False)
    args._global_batch_size_given = explicit_global  # repeatable validation
    if args.global_batch_size is None:
        args.global_batch_size = micro * dp * (accum[0][1] if accum else 1)
        logger.info("setting global batch size to %d", args.global_batch_size)
    _need(args.global_batch_size > 0, f"--global-batch-size must be positive, got {args.global_batch_size}")
    schedule = build_batch_schedule(args.global_batch_size, micro, dp, args.rampup_batch_size,
                                    args.step_batch_size_schedule, args.seq_length,
                                    args.decrease_batch_size_if_needed)
    if args.step_batch_size_schedule is not None and explicit_global:
        # Megatron 0.19 refuses both (which fails its own GPT-3 175B example); mindtron accepts a
        # --global-batch-size that is the schedule's final size, since then the two agree.
        _need(args.global_batch_size == schedule.global_batch_size,
              f"--global-batch-size {args.global_batch_size} differs from the last batch size of "
              f"--step-batch-size-schedule ({schedule.global_batch_size}); drop --global-batch-size (the schedule "
              "decides the batch) or make them equal")
    if schedule.varies or args.decrease_batch_size_if_needed:
        _need(not accum, f"{flag_label(accum[0][0]) if accum else ''} fixes the micro-batch count, which the "
              "batch-size schedule (--rampup-batch-size / --step-batch-size-schedule / "
              "--decrease-batch-size-if-needed) decides; drop it")
        micro_batches = schedule.num_microbatches(0, check=False)
    else:
        micro_batches = schedule.num_microbatches(0)  # raises when the batch does not divide
        for dest, value in accum:
            _need(value == micro_batches,
                  f"{flag_label(dest)} {value} does not match --global-batch-size {args.global_batch_size} / "
                  f"(--micro-batch-size {micro} x data-parallel size {dp}) = {micro_batches}; give only one")
    # the first iteration's count; with a ramp the training loop asks the schedule every iteration
    args.gradient_accumulation_steps = micro_batches
    args.micro_batch_num = micro_batches
    # Megatron 0.19: evaluation batch sizes default to the training ones
    if args.eval_global_batch_size is None:
        args.eval_global_batch_size = args.global_batch_size
    if args.eval_micro_batch_size is None:
        args.eval_micro_batch_size = micro
    _need(args.eval_global_batch_size % (args.eval_micro_batch_size * dp) == 0,
          f"--eval-global-batch-size {args.eval_global_batch_size} must be divisible by --eval-micro-batch-size "
          f"{args.eval_micro_batch_size} x data-parallel size {dp}")
    if {"eval_global_batch_size", "eval_micro_batch_size"} & user:
        _need(args.eval_micro_batch_size == micro and args.eval_global_batch_size == args.global_batch_size,
              "--eval-global-batch-size / --eval-micro-batch-size different from the training batch are not "
              "implemented: mindtron evaluates with --global-batch-size and --micro-batch-size")


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
        # Megatron-Core 0.19: --vocab-size N is N ids (a NullTokenizer's EOD is N - 1); --no-pad-vocab-size
        # keeps the embedding at exactly that size.
        args.padded_vocab_size = pad_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, tp) \
            if args.pad_vocab_size else args.vocab_size
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
        warn_once("--transformer-impl=transformer_engine", "--transformer-impl transformer_engine is not "
                   "available in mindtron; the local (Megatron legacy) layers are used")
    if args.num_experts == 0:
        args.num_experts = None
    if args.expert_model_parallel_size > 1:
        _need(args.num_experts is not None, "--expert-model-parallel-size > 1 needs --num-experts")
        _need(args.num_experts % args.expert_model_parallel_size == 0, f"--num-experts {args.num_experts} "
              f"should be a multiple of --expert-model-parallel-size {args.expert_model_parallel_size}")
        _need(not args.fp16, "expert parallelism is not supported with --fp16; use --bf16")
    _validate_moe(args)
    if args.apply_query_key_layer_scaling:
        args.attention_softmax_in_fp32 = True


def _validate_model_options(args: argparse.Namespace) -> None:
    """Values of core_r0.19.0's model flags that mindtron cannot honour, and what Megatron derives from them
    (flags refused whatever their value are flag_policy's)."""
    _need(args.position_embedding_type not in ("mrope", "relative"),
          f"--position-embedding-type {args.position_embedding_type} is not available in mindtron: multimodal RoPE "
          "and T5's relative position buckets are not implemented; use learned_absolute, rope, yarn or none")
    if args.no_weight_decay_cond_type == "apply_wd_to_qk_layernorm":
        args.apply_wd_to_qk_layernorm = True
    # Megatron seeds each data-parallel rank differently and broadcasts rank 0's weights: only the dropout
    # masks change, and mindtron's masks come from one stream per tensor-parallel rank.
    _need(not (args.data_parallel_random_init and (args.hidden_dropout > 0 or args.attention_dropout > 0)),
          "--data-parallel-random-init with dropout is not available in mindtron: it would draw different dropout "
          "masks on each data-parallel rank (the weights are the same anyway, initialised from --seed and each "
          "parameter's name); drop the flag or set --hidden-dropout 0 --attention-dropout 0")
    if args.swiglu and args.bias_swiglu_fusion and args.activation_func_clamp_value is not None:
        warn_once("--activation-func-clamp-value", "--activation-func-clamp-value has no effect with --swiglu and "
                  "the fused bias-SwiGLU (Megatron's default): pass --no-bias-swiglu-fusion to clamp")


def _validate_moe(args: argparse.Namespace) -> None:
    """The MoE settings against the model and the parallel sizes, before any process group exists."""
    from mindtron.parallel_core.parallel_state import make_layout
    from mindtron.training.config_mapping import moe_config_from_args

    if args.num_experts is not None and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size  # Megatron's default, with its warning
        logger.info("moe_ffn_hidden_size is not set, using ffn_hidden_size for MoE instead")
    moe = moe_config_from_args(args)
    moe.validate(args.hidden_size, args.ffn_hidden_size, args.num_layers, args.add_bias_linear)
    make_layout(args.world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, None,
                args.context_parallel_size, args.expert_model_parallel_size,
                expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    moe.validate_parallel(args.tensor_model_parallel_size, args.expert_model_parallel_size,
                          args.expert_tensor_parallel_size, args.sequence_parallel, args.add_bias_linear)


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
                  f"{flag_label(dest)} needs --weight-decay-incr-style linear or cosine")
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
    if args.ckpt_format != "safetensors" and "ckpt_format" in user:
        warn_once("--ckpt-format", f"--ckpt-format {args.ckpt_format} is not available in mindtron; "
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
