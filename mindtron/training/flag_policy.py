"""What mindtron does with each Megatron flag, as data: implemented, accepted and ignored, or refused.

- implemented: the flag lands in a typed config (`config_mapping.CONFIG_MAP`) or the argument layer / the
  training loop acts on it (`ARGUMENT_LAYER`, with where).
- ignored: accepted, and setting it to a value other than its default warns once (NotImplementedFlagWarning)
  with the reason. Used for flags without effect on the maths here (kernel fusions whose unfused path computes
  the same, NCCL and CUDA-graph tuning, offloading, logging backends, inference servers, ...) and for features
  other work streams are adding (MoE, context-parallel variants, logging).
- refused: setting it to a value other than its default is a ValueError naming the flag and the reason,
  because ignoring it would silently change the model, the data or the optimizer (FP8, Mamba and hybrid
  layers, multi-latent attention, Megatron features not ported yet, ...).

`policy(flag)` resolves a flag: implemented first, then `_BY_OPTION`, then the first `_FAMILIES` rule whose
option prefix matches, then the group's default in `_GROUP_DEFAULTS`. Every rule carries its reason, so
`policy_table()` can print "implemented / accepted and ignored, with why / refused, with why" for every flag
(tests/test_arguments.py checks each flag resolves to a rule with a reason).
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Tuple

from mindtron.training import megatron_flags as mf

__all__ = ["IMPLEMENTED", "IGNORED", "REFUSED", "Policy", "policy", "policy_table", "ARGUMENT_LAYER",
           "NOT_IMPLEMENTED", "REFUSED_FLAGS", "NotImplementedFlagWarning", "check_flags", "warn_once",
           "reset_warnings"]

IMPLEMENTED, IGNORED, REFUSED = "implemented", "ignored", "refused"


@dataclass(frozen=True)
class Policy:
    """One flag's treatment: `status` (implemented / ignored / refused) and why (or where, if implemented)."""

    status: str
    reason: str


# ---------------------------------------------------------------------------------------------------------
# Implemented without a config field: the argument layer (parse / validate) or the loop uses the value.
# ---------------------------------------------------------------------------------------------------------
ARGUMENT_LAYER: Dict[str, str] = {
    "yaml_cfg": "loads the YAML file (yaml_arguments.py)",
    "encoder_num_layers": "the same as --num-layers (validate_arguments.py)",
    "encoder_seq_length": "the same as --seq-length (validate_arguments.py)",
    "recompute_activations": "selects --recompute-granularity selective, as Megatron does",
    "add_position_embedding": "--no-position-embedding: rejected with Megatron's hint (use "
                              "--position-embedding-type none)",
    "batch_size": "deprecated in Megatron: rejected with the replacement flag",
    "warmup": "deprecated in Megatron: rejected with the replacement flag",
    "model_parallel_size": "deprecated in Megatron: rejected with the replacement flag",
    "checkpoint_activations": "deprecated in Megatron: rejected with the replacement flag",
    "deprecated_use_mcore_models": "deprecated in Megatron (no effect there either)",
    "use_dist_ckpt_deprecated": "deprecated in Megatron (no effect there either)",
    "dist_ckpt_format_deprecated": "deprecated in Megatron (no effect there either)",
    "ckpt_fully_parallel_save_deprecated": "deprecated in Megatron (no effect there either)",
    "local_rank": "read from the launcher; mindtron takes ranks from msrun",
    "overlap_p2p_comm": "checked with virtual pipeline stages, as Megatron does",
    "num_virtual_stages_per_pipeline_rank": "virtual pipeline chunks per rank (validate_arguments.py)",
    "transformer_impl": "local is mindtron's only implementation; transformer_engine warns and uses it",
    "ckpt_format": "mindtron always writes its own safetensors format; other names warn",
    "optimizer": "adam and sgd; the others are refused with a message",
    "eval_global_batch_size": "must equal the training batch here (evaluation reuses the training batches)",
    "eval_micro_batch_size": "must equal --micro-batch-size here (evaluation reuses the training batches)",
    "data_args_path": "a file holding the --data-path value",
    "per_split_data_args_path": "a JSON file holding train/valid/test data paths",
    "tokenizer_type": "builds the tokenizer (data/tokenizers.py)",
    "vocab_file": "GPT2BPETokenizer's vocab.json",
    "merge_file": "GPT2BPETokenizer's merges.txt",
    "tokenizer_model": "SentencePiece model file / HuggingFace name or directory",
    "vocab_size": "NullTokenizer's vocabulary size (0.19: N ids, EOD = N - 1)",
    "padded_vocab_size": "the model's embedding rows",
    "make_vocab_size_divisible_by": "vocabulary padding multiple",
    "pad_vocab_size": "--no-pad-vocab-size: the embedding has the tokenizer's own size",
    "null_tokenizer_eod_id": "NullTokenizer's EOD id",
    "null_tokenizer_pad_id": "NullTokenizer's pad id",
    "special_tokens": "extra special tokens (HuggingFace, GPT2BPETokenizer, legacy SentencePiece)",
    "tokenizer_sentencepiece_legacy": "SentencePiece wrapper's legacy special-token handling",
    "tokenizer_sentencepiece_ignore_extra_whitespaces": "SentencePiece: keep repeated spaces as pieces",
    "tokenizer_hf_no_use_fast": "HuggingFace slow tokenizer",
    "tokenizer_hf_no_include_special_tokens": "HuggingFace: no BOS/EOS added by the tokenizer",
    "trust_remote_code": "HuggingFace remote code",
    "no_weight_decay_cond_type": "apply_wd_to_qk_layernorm sets --apply-wd-to-qk-layernorm, as in Megatron",
    "data_parallel_random_init": "accepted without dropout (the weights come from --seed and each parameter's "
                                 "name on every rank); refused with dropout (validate_arguments.py)",
}

# ---------------------------------------------------------------------------------------------------------
# Reasons, shared by families
# ---------------------------------------------------------------------------------------------------------
_SAME_MATHS = "a fused kernel whose unfused path computes the same here"
_GPU_TUNING = "GPU/NCCL/CUDA tuning with no effect on the results"
_CUDA_GRAPHS = "CUDA-graph capture: a GPU launch optimisation with no effect on the results"
_OFFLOAD = "host offloading only moves tensors; the results are the same"
_FSDP = ("FSDP shards parameters and gradients across ranks with the same maths; use "
         "--use-distributed-optimizer for sharded optimizer state")
_NOT_TRAINING = "not used by GPT pre-training"
_INFERENCE = "inference engine / server option; not used by training"
_RL = "reinforcement-learning (GRPO) option; not used by pre-training"
_OBSERVABILITY = "monitoring / fault-tolerance service of NVIDIA's stack; no effect on the results"
_LOGGING = ("a logging or monitoring option of NVIDIA's stack that mindtron does not have (its TensorBoard, W&B, "
            "timers and memory reports are implemented); the run is unchanged")
_PROFILING = ("a PyTorch/CUDA profiler option; mindtron profiles with MindSpore's profiler (--profile and the "
              "profile_* options); the run is unchanged")
_EXIT_SIGNAL = ("Megatron's per-component exit-signal switches; mindtron's --exit-signal-handler stops training "
                "cleanly and the data loader needs no handler of its own")
_MOE_SAME = "an MoE kernel fusion, communication backend or overlap with no effect on the results here"
_MOE_MODEL = "changes the MoE model or its routing and is not implemented in mindtron"
_MOE_UNUSED = "an MoE option for inference, debugging or tracing; not used by pre-training"
_CP = ("Megatron's dynamic (per-batch) context-parallel sizing for packed variable-length sequences; mindtron "
       "uses one --context-parallel-size with --cp-comm-type")
_CKPT_OPS = "how Megatron writes or reads its own checkpoint formats; mindtron's checkpoints are unaffected"
_FP8 = ("low-precision (FP8/FP4/MXFP8) training needs Transformer Engine kernels mindtron does not have; "
        "the numerics would differ")
_MAMBA = "Mamba / hybrid / linear-attention layers are not implemented; the model would differ"
_MLA = "multi-latent attention is not implemented; the model would differ"
_MODEL_TODO = "changes the model's maths and is not implemented in mindtron yet"
_OPTIM_TODO = "changes the optimizer or learning rate and is not implemented in mindtron yet"
_DATA_TODO = "changes the training data and is not implemented in mindtron yet"

# Flags named one by one (before the families).
_BY_OPTION: Dict[str, Tuple[str, str]] = {
    # model maths not ported yet (network size / transformer configuration)
    **{o: (REFUSED, _MODEL_TODO) for o in (
        "--qk-clip", "--qk-clip-alpha", "--qk-clip-threshold", "--heterogeneous-layers-config-path",
        "--heterogeneous-layers-config-encoded-json", "--spec",
    )},
    "--apply-residual-connection-post-layernorm": (IGNORED, "Megatron-Core core_r0.19.0 defines it but no layer "
                                                            "reads it"),
    **{o: (IGNORED, "read only with --position-embedding-type relative / mrope, which are refused")
       for o in ("--relative-attention-num-buckets", "--relative-attention-max-distance", "--mrope-section")},
    "--rope-type": (IGNORED, "Megatron reads it only with multi-latent attention (refused); use "
                             "--position-embedding-type rope or yarn"),
    **{o: (REFUSED, "a different kind of training (RL, SFT, vision) that mindtron does not implement")
       for o in ("--perform-rl-step", "--sft", "--vision-pretraining")},
    **{o: (IGNORED, _SAME_MATHS) for o in (
        "--use-te-activation-func", "--use-fused-weighted-squared-relu", "--no-clone-scatter-output-in-embedding",
        "--disable-clone-scatter-output-in-embedding")},
    "--onnx-safe": (IGNORED, "ONNX export workarounds; not used by training"),
    "--mamba-inference-conv-states-dtype": (IGNORED, _INFERENCE),
    "--mamba-inference-ssm-states-dtype": (IGNORED, _INFERENCE),
    **{o: (REFUSED, _OPTIM_TODO) for o in (
        "--freeze-all-layers", "--use-precision-aware-optimizer", "--exp-avg-dtype", "--exp-avg-sq-dtype",
        "--main-params-dtype", "--lion-beta1", "--lion-beta2",
    )},
    **{o: (REFUSED, _DATA_TODO) for o in (
        "--dataloader-inter-document-masking", "--phase-transition-iterations", "--allow-ambiguous-pad-tokens",
    )},
    "--bert-no-binary-head": (IGNORED, "BERT only; " + _NOT_TRAINING),
    "--decoder-seq-length": (IGNORED, "encoder-decoder (T5) models only; " + _NOT_TRAINING),
    "--deterministic-mode": (IGNORED, "mindtron's kernels on CPU are deterministic; elsewhere MindSpore's own "
                                      "determinism settings apply"),
    "--grad-reduce-in-bf16": (REFUSED, "mindtron accumulates and reduces gradients in fp32"),
    "--main-grads-dtype": (REFUSED, "mindtron keeps fp32 main gradients"),
    "--decoder-num-layers": (IGNORED, "encoder-decoder (T5) models only; " + _NOT_TRAINING),
    "--sample-rate": (IGNORED, "BERT/T5 datasets only; " + _NOT_TRAINING),
    "--mask-prob": (IGNORED, "BERT/T5 masking only; " + _NOT_TRAINING),
    "--short-seq-prob": (IGNORED, "BERT/T5 datasets only; " + _NOT_TRAINING),
    "--vocab-extra-ids": (IGNORED, "T5 sentinel tokens; Megatron-Core 0.19's tokenizers do not use it either"),
    "--mid-level-dataset-surplus": (IGNORED, "sizes Megatron's intermediate blend indices; the samples drawn "
                                             "are the same"),
    "--num-dataset-builder-threads": (IGNORED, "index building parallelism; the same indices"),
    "--dataloader-defer-npy-index-mmap": (IGNORED, "when index files are mapped; the same data"),
    "--dataloader-fast-cache-load": (IGNORED, "how cached indices are loaded; the same data"),
    "--per-dataset-sequences-path": (IGNORED, "precomputed sequence counts (a speed-up); the same data"),
    "--object-storage-cache-path": (IGNORED, "object-storage cache; mindtron reads local files"),
    "--no-mmap-bin-files": (IGNORED, "reads .bin files without mmap; the same data"),
    "--no-create-attention-mask-in-dataloader": (IGNORED, "where the causal mask is built; the same mask"),
    "--tokenizer-metadata": (REFUSED, "tokenizer metadata files of Megatron-Core are not read; name the "
                                      "tokenizer with --tokenizer-type and its files"),
    "--tiktoken-pattern": (REFUSED, "TikTokenizer is not implemented"),
    "--tiktoken-num-special-tokens": (REFUSED, "TikTokenizer is not implemented"),
    "--chat-template": (IGNORED, "chat templates are for SFT/inference; pre-training data is unaffected"),
    "--use-checkpoint-args": (REFUSED, "would take the model settings from the checkpoint; give them as flags"),
    "--use-mp-args-from-checkpoint-args": (REFUSED, "would take the parallel layout from the checkpoint; "
                                                    "give it as flags"),
    "--no-use-tokenizer-model-from-checkpoint-args": (IGNORED, "only with --use-checkpoint-args"),
    "--ckpt-convert-format": (REFUSED, "use python -m mindtron.convert to convert checkpoints"),
    "--ckpt-convert-save": (REFUSED, "use python -m mindtron.convert to convert checkpoints"),
    "--pretrained-checkpoint": (REFUSED, "use --load DIR --finetune to start from pretrained weights"),
    "--ckpt-step": (REFUSED, "loading a chosen iteration is not implemented; point --load at a directory "
                             "whose latest_checkpointed_iteration.txt names it"),
    "--override-ckpt-iteration": (REFUSED, "overriding the loaded iteration is not implemented"),
    "--full-validation": (REFUSED, "evaluating the whole validation set is not implemented; use --eval-iters"),
    "--multiple-validation-sets": (REFUSED, "several validation sets are not implemented"),
    "--validation-set-names": (REFUSED, "several validation sets are not implemented"),
    "--skip-train": (REFUSED, "evaluation-only runs are not implemented"),
    "--start-eval-at-iter": (REFUSED, "delaying the first evaluation is not implemented"),
    "--test-mode": (IGNORED, "Megatron's own data-pipeline self test"),
    "--error-injection-rate": (REFUSED, "would inject errors into the results (Megatron's rerun-engine test)"),
    "--disable-bf16-reduced-precision-matmul": (IGNORED, "a cuBLAS setting; mindtron's matmuls are unaffected"),
    "--mamba-training-ssm-states-dtype": (REFUSED, _MAMBA),
    "--use-mcore-models": (IGNORED, "deprecated in Megatron"),
    "--logging-level": (IGNORED, _LOGGING),
    "--disable-msc": (IGNORED, "Multi-Storage Client (object storage); mindtron reads local files"),
    "--enable-msc": (IGNORED, "Multi-Storage Client (object storage); mindtron reads local files"),
    "--enable-experimental": (IGNORED, "unlocks Megatron's experimental code paths, none of which exist here"),
    "--disable-mamba-mem-eff-path": (IGNORED, "Mamba only"),
    "--config-logger-dir": (IGNORED, _LOGGING),
    "--flash-decode": (IGNORED, _INFERENCE),
    "--use-cpu-initialization": (IGNORED, "mindtron always draws each full parameter on the host from the seed "
                                          "and the parameter's name (this flag's semantics), whatever is given"),
    "--no-initialization": (IGNORED, "mindtron always initialises; weights loaded with --load replace the "
                                     "initial values"),
}

# Option-prefix families: (status, reason, prefixes). The first matching rule wins.
_FAMILIES: List[Tuple[str, str, Tuple[str, ...]]] = [
    (REFUSED, _FP8, ("--fp8-", "--fp4-", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16",
                     "--num-layers-at-end-in-bf16", "--te-precision-config-file", "--reuse-grad-buf-for-mxfp8",
                     "--keep-fp8-transpose-cache", "--no-fp8-wgrad")),
    (IGNORED, _CP, ("--hybrid-context-parallel", "--max-seqlen-per-dp-cp-rank")),
    (REFUSED, _MAMBA, ("--mamba-", "--is-hybrid-model", "--hybrid-", "--linear-", "--experimental-attention-variant",
                       "--dsa-", "--no-dsa-", "--disable-dsa-")),
    (REFUSED, _MLA, ("--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim",
                     "--qk-pos-emb-head-dim", "--v-head-dim", "--rotary-scaling-factor", "--mscale",
                     "--cache-mla-latents", "--mla-")),
    (REFUSED, "multi-token prediction is not implemented; the loss would differ", ("--mtp-",)),
    (REFUSED, "muP parametrisation is not implemented; the model would differ", ("--use-mup", "--mup-")),
    (REFUSED, "YaRN rotary scaling is not implemented; the model would differ", ("--yarn-",)),
    (REFUSED, "Muon optimizer is not implemented; use --optimizer adam or sgd", ("--muon-",)),
    (REFUSED, "fill-in-the-middle data transforms are not implemented; the data would differ", ("--fim-",)),
    (REFUSED, "logits distillation is not implemented; the loss would differ", ("--logits-",)),
    (REFUSED, "NVIDIA's quantization toolkit (kitchen) is not available", ("--use-kitchen", "--kitchen-")),
    (REFUSED, _MOE_MODEL, ("--moe-latent-size", "--moe-use-upcycling", "--moe-upcycling-granularity",
                           "--moe-router-force-biased", "--moe-expert-rank-capacity-factor",
                           "--moe-mlp-glu-interleave-size", "--moe-shared-expert-glu-interleave-size",
                           "--moe-router-quantile-balancing-ema", "--expert-tensor-parallel-num-weight-shards")),
    (IGNORED, _MOE_UNUSED, ("--moe-routing-trace-", "--moe-enable-routing-replay",
                            "--moe-pad-experts-for-cuda-graph-inference")),
    (IGNORED, _MOE_SAME, ("--moe-", "--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute",
                          "--ep-overlap-early-attn-memory-release", "--overlap-dispatch-backward-with-experts-wgrad",
                          "--use-grouped-gemm-for-shared-expert", "--high-priority-a2a-comm-stream")),
    (IGNORED, _EXIT_SIGNAL, ("--exit-signal",)),
    (IGNORED, _CUDA_GRAPHS, ("--cuda-graph-", "--external-cuda-graph", "--optimizer-cuda-graph",
                             "--inference-cuda-graph-", "--delay-offload-until-cuda-graph",
                             "--decode-only-cuda-graphs")),
    (IGNORED, _OFFLOAD, ("--cpu-offloading", "--fine-grained-", "--offload-modules", "--activation-offload-",
                         "--min-offloaded-tensor-size", "--delta-offload-bytes", "--optimizer-cpu-offload",
                         "--optimizer-offload-fraction", "--use-torch-optimizer-for-cpu-offload",
                         "--overlap-cpu-optimizer-d2h-h2d", "--no-pin-cpu-")),
    (IGNORED, _SAME_MATHS, ("--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                            "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
                            "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl",
                            "--fused-residual-rmsnorm", "--use-transformer-engine-op-fuser",
                            "--no-gradient-reduce-div-fusion", "--disable-jit-fuser", "--batch-invariant-mode",
                            "--attention-backend", "--flash-attention-version", "--use-grouped-gemm-for-dense-mlp",
                            "--mlp-chunks-for-training")),
    (IGNORED, "activation recompute choices that keep the results (mindtron recomputes by "
              "--recompute-granularity/--recompute-method)", ("--recompute-modules",
                                                               "--distribute-saved-activations")),
    (IGNORED, _GPU_TUNING, ("--tp-comm-", "--no-tp-comm-", "--disable-tp-comm-", "--distributed-backend",
                            "--distributed-timeout-", "--nccl-", "--use-nccl-ub", "--use-sharp", "--sharp-",
                            "--disable-symmetric-registration", "--create-all-gather-group",
                            "--fake-process-group", "--flight-recorder-", "--no-flight-recorder-",
                            "--disable-flight-recorder-", "--high-priority-stream-groups",
                            "--disable-gloo-process-groups", "--lazy-mpu-init", "--ddp-pad-buckets",
                            "--ddp-num-buckets", "--ddp-average-in-collective",
                            "--ddp-reduce-scatter-with-fp32-accumulation", "--ddp-param-name-patterns",
                            "--no-align-grad-reduce", "--disable-align-grad-reduce", "--no-align-param-gather",
                            "--overlap-p2p-communication-warmup-flush", "--use-ring-exchange-p2p",
                            "--pipeline-model-parallel-comm-backend", "--defer-embedding-wgrad-compute",
                            "--wgrad-deferral-limit", "--microbatch-group-size-per-virtual-pipeline-stage",
                            "--num-distributed-optimizer-instances", "--tensor-parallel-num-weight-shards",
                            "--empty-unused-memory-level", "--manual-gc", "--no-manual-gc-eval",
                            "--disable-manual-gc-eval", "--train-sync-interval", "--symmetric-ar-type",
                            "--nccl-all-reduce-for-prefill", "--mlp-chunks-for-prefill",
                            "--inference-disable-triton-nvls-kernels", "--inference-fuse-tp-communication",
                            "--inference-grouped-gemm-backend", "--inference-moe-")),
    (IGNORED, _FSDP, ("--use-megatron-fsdp", "--use-torch-fsdp2", "--data-parallel-sharding-strategy",
                      "--outer-dp-sharding-strategy", "--fsdp-", "--megatron-fsdp-", "--init-model-with-meta-device",
                      "--enable-full-sharding-in-hsdp", "--suggested-communication-unit-size",
                      "--torch-fsdp2-no-reshard-after-forward", "--no-use-layer-wise-param-layout")),
    (IGNORED, _CKPT_OPS, ("--async-", "--ckpt-fully-parallel-", "--no-ckpt-fully-parallel-save",
                          "--ckpt-assume-constant-structure", "--dist-ckpt-", "--distrib-optim-fully-reshardable",
                          "--auto-detect-ckpt-format", "--non-persistent-", "--use-persistent-ckpt-worker",
                          "--no-strict-fsdp-dtensor-load", "--disable-strict-fsdp-dtensor-load",
                          "--no-ckpt-load-validate-sharding-integrity", "--no-stream-ckpt-dequant",
                          "--replication", "--verify-integrity", "--save-retain-interval")),
    (IGNORED, "debugging dumps of activations, gradients and parameters; not implemented",
     ("--save-activations-interval", "--save-dgrads-interval", "--save-params-interval", "--save-wgrads-interval",
      "--save-tokens-per-expert-interval", "--dump-param-to-param-group-map")),
    (IGNORED, "numerical health checks that do not change a healthy run",
     ("--check-for-large-grads", "--check-weight-hash-across-dp-replicas-interval", "--gpu-sniff-test-interval",
      "--result-rejected-tracker-filename", "--rerun-mode", "--error-injection-type", "--check-for-spiky-loss")),
    (IGNORED, _PROFILING, ("--profile", "--use-pytorch-profiler", "--pytorch-profiler-", "--record-",
                           "--memory-snapshot-path", "--nvtx-ranges")),
    (IGNORED, _LOGGING, ("--log-", "--no-log-", "--disable-log-", "--tensorboard-", "--wandb-", "--timing-log-",
                         "--no-barrier-with-level-1-timing", "--moe-routing-trace-")),
]

# The rest of each group.
_GROUP_DEFAULTS: Dict[str, Tuple[str, str]] = {
    "transformer configuration": (REFUSED, _MODEL_TODO),
    "network size": (REFUSED, _MODEL_TODO),
    "regularization": (REFUSED, _OPTIM_TODO),
    "learning rate and weight decay": (REFUSED, _OPTIM_TODO),
    "mixed precision": (REFUSED, _MODEL_TODO),
    "RNG and initialization": (IGNORED, "Transformer Engine / inference RNG trackers; mindtron's RNG tracker "
                                        "draws the same streams"),
    "Transformer-Engine": (REFUSED, _FP8),
    "training": (REFUSED, _MODEL_TODO),
    "distributed init": (IGNORED, _GPU_TUNING),
    "checkpointing": (IGNORED, _CKPT_OPS),
    "data and dataloader": (REFUSED, _DATA_TODO),
    "tokenizer": (REFUSED, "tokenizer option not implemented; the token ids would differ"),
    "validation": (REFUSED, "evaluation option not implemented"),
    "logging": (IGNORED, _LOGGING),
    "profiling": (IGNORED, _PROFILING),
    "moe": (IGNORED, _MOE_SAME),
    "mla": (REFUSED, _MLA),
    "experimental": (REFUSED, _MODEL_TODO),
    "experimental_attention_variant": (REFUSED, _MAMBA),
    "heterogeneous architecture": (REFUSED, "heterogeneous layer configurations are not implemented"),
    "inference": (IGNORED, _INFERENCE),
    "rl": (IGNORED, _RL),
    "sft": (IGNORED, "supervised fine-tuning data format; " + _NOT_TRAINING),
    "vision": (IGNORED, "vision models; " + _NOT_TRAINING),
    "biencoder": (IGNORED, "retrieval (ICT/biencoder) models; " + _NOT_TRAINING),
    "Logits Distillation": (REFUSED, "logits distillation is not implemented; the loss would differ"),
    "In-process restart": (IGNORED, _OBSERVABILITY),
    "fault injector": (IGNORED, "fault injection for resilience tests; " + _OBSERVABILITY),
    "ft_package": (IGNORED, _OBSERVABILITY),
    "straggler": (IGNORED, _OBSERVABILITY),
    "one logger": (IGNORED, _OBSERVABILITY),
    "workload inspector": (IGNORED, _OBSERVABILITY),
    "rerun engine": (IGNORED, "Megatron's result-validation reruns; a healthy run is unchanged"),
    "autoresume": (IGNORED, "cluster auto-resume service; " + _OBSERVABILITY),
    "msc": (IGNORED, "Multi-Storage Client (object storage); mindtron reads local files"),
    "mindtron: training (documents 000-002)": (IGNORED, _PROFILING),
}


def _implemented_dests() -> Dict[str, str]:
    from mindtron.training.config_mapping import CONFIG_MAP

    where: Dict[str, str] = {}
    for dest, target in CONFIG_MAP:
        where.setdefault(dest, target)
    for dest, note in ARGUMENT_LAYER.items():
        where.setdefault(dest, note)
    return where


_POLICIES: Dict[str, Policy] = {}


def policy(flag: mf.Flag) -> Policy:
    """How mindtron treats `flag` (see the module docstring for the order of the rules)."""
    cached = _POLICIES.get(flag.name)
    if cached is not None:
        return cached
    result = _resolve(flag)
    _POLICIES[flag.name] = result
    return result


def _resolve(flag: mf.Flag) -> Policy:
    implemented = _implemented_dests()
    if flag.dest in implemented:
        return Policy(IMPLEMENTED, implemented[flag.dest])
    if flag.name in _BY_OPTION:
        return Policy(*_BY_OPTION[flag.name])
    for status, reason, prefixes in _FAMILIES:
        if any(o.startswith(p) for p in prefixes for o in flag.options):
            return Policy(status, reason)
    if flag.group in _GROUP_DEFAULTS:
        return Policy(*_GROUP_DEFAULTS[flag.group])
    raise KeyError(f"{flag.name} (group {flag.group!r}) has no policy in flag_policy.py")


def policy_table() -> List[Tuple[str, str, str, str]]:
    """(option, group, status, reason or where) for every flag, in table order; for documentation."""
    return [(f.name, f.group, policy(f).status, policy(f).reason) for f in mf.ALL_FLAGS]


NOT_IMPLEMENTED = frozenset(f.name for f in mf.ALL_FLAGS if policy(f).status == IGNORED)
"""Flags accepted without effect: setting one to a non-default value warns once."""
REFUSED_FLAGS = frozenset(f.name for f in mf.ALL_FLAGS if policy(f).status == REFUSED)
"""Flags refused when set to a non-default value."""


class NotImplementedFlagWarning(UserWarning):
    """A Megatron flag (or value) that mindtron accepts but does not act on."""


_WARNED: set = set()


def warn_once(key: str, message: str) -> None:
    """One NotImplementedFlagWarning per key per process, whatever the warnings filter says."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, NotImplementedFlagWarning, stacklevel=4)


def reset_warnings() -> None:
    """Forget which warnings were given (tests)."""
    _WARNED.clear()


def _is_default(value: Any, default: Any) -> bool:
    if value == default:
        return True
    # a list flag given its default's items, or an enum given by its value
    return isinstance(default, (list, tuple)) and list(value or []) == list(default)


def check_flags(args: argparse.Namespace, user_set: Iterable[str]) -> None:
    """Refuse (ValueError) or warn about the flags the user set to a value other than their default."""
    refused: List[str] = []
    for dest in sorted(user_set):
        flag = mf.FLAGS_BY_DEST.get(dest)
        if flag is None:
            continue
        value = getattr(args, dest, flag.default)
        if _is_default(value, flag.default):
            continue
        rule = policy(flag)
        if rule.status == REFUSED:
            refused.append(f"{flag.name} {_show(value)}: {rule.reason}")
        elif rule.status == IGNORED:
            warn_once(flag.name, f"{flag.name} is accepted for Megatron compatibility and ignored: {rule.reason}")
    if refused:
        raise ValueError("flag(s) mindtron cannot honour (remove them or leave them at Megatron's default): "
                         + "; ".join(refused))


def _show(value: Any) -> str:
    if value is True:
        return "(set)"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(getattr(value, "name", value))
