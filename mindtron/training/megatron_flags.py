"""Megatron-LM's command-line flags as data: name, type, default, choices, nargs, action and dest.

The facts (flag names, types, defaults, choices, nargs, store_true/store_false, dest) follow Megatron-LM's
`megatron/training/arguments.py`; the layout is mindtron's own: one list per Megatron argument group, one
`Flag` per option, no help texts (mindtron's meaning of a flag lives in the config field it maps to, see
`arguments.py`). `build_parser` turns the table into an argparse parser.

Helpers, so that a row reads like the flag:
    val("--num-layers", int)                  value flag, default None
    val("--lr-decay-style", str, "linear", choices=(...))
    on("--swiglu")                            store_true (default False)
    off("--no-masked-softmax-fusion", "masked_softmax_fusion")   store_false (default True)
"""
from __future__ import annotations

import argparse
import ast
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Flag", "GROUPS", "ALL_FLAGS", "FLAGS_BY_DEST", "FLAGS_BY_OPTION", "build_parser", "add_flags"]


@dataclass(frozen=True)
class Flag:
    """One Megatron option: its option strings, where argparse stores it and how it converts the text."""

    options: Tuple[str, ...]
    """Option strings, the canonical one first (e.g. ("--fp8-format",))."""
    dest: str
    """Attribute on the parsed namespace."""
    action: str = "store"
    """"store", "store_true", "store_false", "append" or "bool_optional" (`--x` / `--no-x`)."""
    type: Optional[Callable[[str], Any]] = None
    default: Any = None
    choices: Optional[Tuple[Any, ...]] = None
    nargs: Any = None
    const: Any = None
    group: str = ""

    @property
    def all_options(self) -> Tuple[str, ...]:
        """Every option string argparse accepts for this flag (with `--no-x` for bool_optional)."""
        if self.action == "bool_optional":
            return tuple(o for opt in self.options for o in (opt, "--no-" + opt[2:]))
        return self.options

    @property
    def name(self) -> str:
        """The canonical `--kebab-case` option."""
        return self.options[0]

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for `argparse.ArgumentParser.add_argument`."""
        kw: Dict[str, Any] = {"dest": self.dest, "action": self.action, "default": self.default}
        if self.action == "bool_optional":
            kw["action"] = argparse.BooleanOptionalAction
            return kw
        if self.action in ("store", "append"):
            if self.type is not None:
                kw["type"] = self.type
            if self.choices is not None:
                kw["choices"] = self.choices
            if self.nargs is not None:
                kw["nargs"] = self.nargs
            if self.nargs == "?":
                kw["const"] = self.const
        return kw


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def val(option: str, type: Optional[Callable] = str, default: Any = None, *, choices: Optional[Sequence] = None,
        nargs: Any = None, dest: Optional[str] = None, aliases: Sequence[str] = (), action: str = "store",
        const: Any = None) -> Flag:
    """A flag that takes a value (argparse "store", or "append")."""
    return Flag((option, *aliases), dest or _dest(option), action, type, default,
                tuple(choices) if choices is not None else None, nargs, const)


def switch(option: str, default: bool) -> Flag:
    """A boolean that reads `--x` (True), `--x false` or `--x true`; for mindtron options whose default
    is True, where a Megatron-style store_true could not turn them off."""
    return val(option, str_to_bool, default, nargs="?", const=True)


def on(option: str, dest: Optional[str] = None, default: Any = False, aliases: Sequence[str] = ()) -> Flag:
    """A store_true switch."""
    return Flag((option, *aliases), dest or _dest(option), "store_true", None, default)


def off(option: str, dest: Optional[str] = None, default: Any = True, aliases: Sequence[str] = ()) -> Flag:
    """A store_false switch (Megatron's `--no-...` flags that clear a default-True dest)."""
    return Flag((option, *aliases), dest or _dest(option), "store_false", None, default)


def both(option: str, default: Any = False, dest: Optional[str] = None) -> Flag:
    """An argparse BooleanOptionalAction: `--x` sets True, `--no-x` sets False."""
    return Flag((option,), dest or _dest(option), "bool_optional", None, default)


# Value converters for Megatron's non-builtin option types (re-implemented, same accepted text) ------------
_PATTERN = re.compile(r"^[\d,\[\]\(\)\+\*\s]+$")


def _eval_list_pattern(text: str) -> list:
    # Patterns such as "([1]*3+[0]*1)*3": only digits, brackets, commas, + and * are allowed, so the
    # expression is evaluated on a tiny arithmetic grammar instead of eval().
    if not _PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"invalid layer pattern {text!r}: use digits, [], (), +, * and commas")
    return _eval_node(ast.parse(text, mode="eval").body)


def _eval_node(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_eval_node(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_eval_node(e) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_node(node.left), _eval_node(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise argparse.ArgumentTypeError("invalid layer pattern")


def layer_freq(text):
    """An int N (one special layer every N) or a list pattern such as "([1]*3+[0])*2"."""
    if text is None or isinstance(text, (int, list)):
        return text
    return _eval_list_pattern(text) if "[" in text else int(text)


def int_tuple(text):
    """"1,2,3" or "(1,2,3)" -> (1, 2, 3)."""
    if text is None or isinstance(text, tuple):
        return text
    if isinstance(text, list):
        return tuple(int(i) for i in text)
    return tuple(int(i) for i in str(text).strip("()").split(","))


def int_from_float(text) -> int:
    """Integers that may be written as floats, e.g. "1e6"."""
    return int(float(text))


def str_to_bool(text) -> bool:
    """"true"/"false" (any case), "1"/"0", "yes"/"no"."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_or_str(text):
    """An int when the text is one, else the text."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return text


def truthy_text(text) -> bool:
    """Megatron declares --onnx-safe and --lazy-mpu-init with type=bool: any non-empty text is True."""
    return bool(text)


# ---------------------------------------------------------------------------------------------------------
# Megatron's argument groups, in the order Megatron registers them (see GROUPS at the end).
# ---------------------------------------------------------------------------------------------------------
_NETWORK_SIZE = [
    val("--num-layers", int),
    val("--encoder-num-layers", int),
    val("--decoder-num-layers", int),
    val("--hidden-size", int),
    val("--ffn-hidden-size", int),
    val("--num-attention-heads", int),
    val("--attention-backend", str, "auto", choices=("flash", "fused", "unfused", "local", "auto")),
    val("--kv-channels", int),
    on("--group-query-attention"),
    val("--num-query-groups", int, 1),
    val("--softmax-type", str, "vanilla", choices=("learnable", "vanilla", "off-by-one")),
    on("--attention-output-gate"),  # core_r0.19.0's "transformer configuration" group (issue 14)
    val("--window-size", int_tuple),
    val("--window-attn-skip-freq", layer_freq),
    val("--max-position-embeddings", int),
    val("--position-embedding-type", str, "learned_absolute",
        choices=("learned_absolute", "rope", "yarn", "mrope", "relative", "none")),
    # core_r0.19.0's YaRN rows (issue 14; the table rebuild from the tsv supersedes)
    val("--yarn-original-max-position-embeddings", int),
    val("--yarn-beta-fast", float),
    val("--yarn-beta-slow", float),
    both("--yarn-correction-range-round-to-int", default=None, dest="yarn_correction_range_round_to_int"),
    val("--relative-attention-num-buckets", int, 32),
    val("--relative-attention-max-distance", int, 128),
    on("--use-rotary-position-embeddings"),
    val("--rotary-base", int, 10000),
    val("--rotary-percent", float, 1.0),
    on("--rotary-interleaved"),
    val("--rotary-seq-len-interpolation-factor", int),
    on("--use-rope-scaling"),
    val("--rope-scaling-factor", float, 8.0),
    val("--no-rope-freq", layer_freq),
    off("--no-position-embedding", "add_position_embedding"),
    val("--mrope-section", int, nargs="+"),
    val("--make-vocab-size-divisible-by", int, 128),
    val("--normalization", str, "LayerNorm", choices=("LayerNorm", "RMSNorm")),
    val("--norm-epsilon", float, 1e-5),
    on("--apply-layernorm-1p", dest="layernorm_zero_centered_gamma"),  # core_r0.19.0's dest
    on("--apply-residual-connection-post-layernorm"),
    on("--openai-gelu"),
    on("--squared-relu"),
    on("--swiglu"),
    on("--quick-geglu"),
    val("--activation-func-clamp-value", float),
    val("--glu-linear-offset", float, 0.0),
    val("--onnx-safe", truthy_text),
    off("--bert-no-binary-head", "bert_binary_head"),
    on("--untie-embeddings-and-output-weights"),
    on("--multi-latent-attention"),
    val("--mtp-num-layers", int),
    val("--mtp-loss-scaling-factor", float, 0.1),
]

_TRANSFORMER_ENGINE = [
    val("--fp8-format", str, choices=("e4m3", "hybrid"), dest="fp8"),
    val("--fp8-recipe", str, "delayed", choices=("tensorwise", "delayed", "mxfp8", "blockwise", "custom")),
    val("--fp8-quantizer-factory", str),
    val("--fp8-margin", int, 0),
    val("--fp8-interval", int, 1),
    val("--fp8-amax-history-len", int, 1),
    val("--fp8-amax-compute-algo", str, "most_recent", choices=("most_recent", "max")),
    off("--no-fp8-wgrad", "fp8_wgrad"),
    val("--transformer-impl", str, "transformer_engine", choices=("local", "transformer_engine")),
    on("--fp8-param-gather"),
    on("--first-last-layers-bf16"),
    val("--num-layers-at-start-in-bf16", int, 1),
    val("--num-layers-at-end-in-bf16", int, 1),
    val("--fp4-format", str, choices=("e2m1",), dest="fp4"),
    val("--fp4-recipe", str, "nvfp4", choices=("nvfp4", "custom")),
    val("--fp4-quantizer-factory", str),
    on("--fp4-param-gather", "fp4_param"),
    on("--te-rng-tracker"),
    on("--inference-rng-tracker"),
]

_INFERENCE = [
    val("--inference-batch-times-seqlen-threshold", int, -1),
    val("--max-tokens-to-oom", int, 12000),
    on("--output-bert-embeddings"),
    val("--bert-embedder-type", str, "megatron", choices=("megatron", "huggingface")),
    on("--flash-decode"),
    on("--enable-cuda-graph"),
    val("--cuda-graph-warmup-steps", int, 3),
    on("--external-cuda-graph"),
    val("--cuda-graph-impl", str, "none", choices=("none", "local", "transformer_engine")),
    val("--cuda-graph-scope", str, "full", choices=("full", "attn", "full_iteration")),
    on("--use-legacy-static-engine"),
    # Two options share one dest in Megatron; argparse keeps the first one's default (8).
    val("--inference-max-requests", int, 8, dest="inference_max_batch_size"),
    val("--inference-max-seq-length", int, 2560),
    val("--inference-max-batch-size", int, None),
    on("--inference-dynamic-batching"),
    val("--inference-dynamic-batching-buffer-size-gb", float, 40.0),
    val("--inference-dynamic-batching-block-size", int, 256),
    val("--inference-dynamic-batching-buffer-guaranteed-fraction", float, 0.2),
    val("--inference-dynamic-batching-buffer-overflow-factor", float),
    val("--inference-dynamic-batching-max-requests-override", int),
    val("--inference-dynamic-batching-max-tokens-override", int),
    val("--inference-dynamic-batching-num-cuda-graphs", int, 16),
    on("--inference-dynamic-batching-track-paused-request-events"),
    on("--decode-only-cuda-graphs"),
    val("--inference-dynamic-batching-unified-memory-level", int, 0, choices=(0, 1)),
    val("--symmetric-ar-type", str, choices=("two_shot", "one_shot", "multimem_all_reduce", None)),
    on("--nccl-all-reduce-for-prefill"),
    val("--mlp-chunks-for-prefill", int, 1),
    on("--disable-chunked-prefill"),
    val("--inference-wandb-logging-step-interval", int, 0),
]

_RETRO = [
    val("--retro-project-dir", str),
    on("--retro-add-retriever"),
    val("--retro-cyclic-train-iters", int),
    val("--retro-encoder-layers", int, 2),
    val("--retro-encoder-hidden-dropout", float, 0.1),
    val("--retro-encoder-attention-dropout", float, 0.1),
    val("--retro-num-neighbors", int, 2),
    val("--retro-num-retrieved-chunks", int, 2),
    val("--retro-attention-gate", float, 1),
    off("--retro-no-verify-neighbor-count", "retro_verify_neighbor_count"),
]

_STRAGGLER = [
    on("--log-straggler"),
    on("--disable-straggler-on-startup"),
    val("--straggler-ctrlr-port", int, 65535),
    val("--straggler-minmax-count", int, 1),
]

_WORKLOAD_INSPECTOR = [
    on("--run-workload-inspector-server"),
]

_INPROCESS_RESTART = [
    on("--inprocess-restart"),
    val("--inprocess-max-iterations", int),
    val("--inprocess-monitor-thread-interval", float, 1.0),
    val("--inprocess-monitor-process-interval", float, 1.0),
    val("--inprocess-progress-watchdog-interval", float, 1.0),
    val("--inprocess-heartbeat-interval", float, 30),
    val("--inprocess-soft-timeout", float, 60),
    val("--inprocess-hard-timeout", float, 90),
    val("--inprocess-heartbeat-timeout", float, 60),
    val("--inprocess-barrier-timeout", float, 120),
    val("--inprocess-completion-timeout", float, 120),
    val("--inprocess-last-call-wait", float, 1),
    val("--inprocess-termination-grace-time", float, 1),
    val("--inprocess-granularity", str, "node", choices=("node", "rank")),
    # Megatron's default is the WORLD_SIZE environment variable.
    val("--inprocess-active-world-size", int, int(os.getenv("WORLD_SIZE", "1"))),
    on("--inprocess-empty-cuda-cache"),
]

_ONE_LOGGER = [
    off("--no-one-logger", "enable_one_logger"),
    val("--one-logger-project", str, "megatron-lm"),
    val("--one-logger-run-name", str),
    on("--one-logger-async"),
    val("--app-tag-run-name", str),
    val("--app-tag-run-version", str, "0.0.0"),
]

_FT_PACKAGE = [
    on("--enable-ft-package"),
    on("--calc-ft-timeouts"),
]

_CONFIG_LOGGER = [
    val("--config-logger-dir", str, ""),
]

_LOGGING = [
    on("--log-params-norm"),
    on("--log-num-zeros-in-grad"),
    on("--log-throughput"),
    on("--log-progress"),
    val("--timing-log-level", int, 0, choices=range(0, 3)),
    on("--log-energy"),
    off("--no-barrier-with-level-1-timing", "barrier_with_L1_time"),
    val("--timing-log-option", str, "minmax", choices=("max", "minmax", "all")),
    val("--tensorboard-log-interval", int, 1),
    val("--tensorboard-queue-size", int, 1000),
    on("--log-timers-to-tensorboard"),
    off("--no-log-loss-scale-to-tensorboard", "log_loss_scale_to_tensorboard"),
    on("--log-validation-ppl-to-tensorboard"),
    on("--log-memory-to-tensorboard"),
    on("--log-world-size-to-tensorboard"),
    val("--wandb-project", str, ""),
    val("--wandb-entity", str, ""),
    val("--wandb-exp-name", str, ""),
    val("--wandb-save-dir", str, ""),
    val("--logging-level", int),
]

_REGULARIZATION = [
    val("--attention-dropout", float, 0.1),
    val("--hidden-dropout", float, 0.1),
    val("--weight-decay", float, 0.01),
    val("--start-weight-decay", float),
    val("--end-weight-decay", float),
    val("--weight-decay-incr-style", str, "constant", choices=("constant", "linear", "cosine")),
    val("--clip-grad", float, 1.0),
    val("--adam-beta1", float, 0.9),
    val("--adam-beta2", float, 0.999),
    val("--adam-eps", float, 1e-08),
    val("--sgd-momentum", float, 0.9),
    val("--muon-momentum", float, 0.9),
    off("--muon-no-split-qkv", "muon_split_qkv"),
    on("--muon-use-nesterov"),
    val("--muon-scale-mode", str, "spectral", choices=("spectral", "unit_rms_norm", "shape_scaling")),
    val("--muon-fp32-matmul-prec", str, "medium", choices=("low", "medium", "high")),
    val("--muon-num-ns-steps", int, 5),
    val("--muon-tp-mode", str, "blockwise", choices=("blockwise", "duplicated", "distributed")),
    val("--muon-extra-scale-factor", float, 1.0),
    # core_r0.19.0 rows the table above lacks (issue 14 model flags; the table rebuild from the tsv supersedes)
    on("--apply-wd-to-qk-layernorm"),
    val("--no-weight-decay-cond-type", str, choices=("apply_wd_to_qk_layernorm",)),
]

_RL = [
    on("--perform-rl-step"),
    val("--rl-prompts-per-eval", int, 32),
    val("--grpo-prompts-per-step", int, 32),
    val("--grpo-group-size", int, 2),
    val("--grpo-iterations", int, 2),
    val("--grpo-clamp-eps-lower", float, 0.01),
    val("--grpo-clamp-eps-upper", float, 0.01),
    val("--grpo-kl-beta", float, 0.001),
    val("--grpo-entropy-term-weight", float, 0.0),
    on("--grpo-filter-groups-with-same-reward"),
    val("--grpo-default-temperature", float, 1.0),
    val("--grpo-default-top-p", float, 0),
    val("--langrl-inference-server-type", str, "inplace_megatron",
        choices=("inplace_megatron", "inplace_megatron_chat")),
    val("--langrl-inference-server-conversation-template", str),
    both("--langrl-external-server"),
    val("--langrl-env-config", str),
    on("--rl-offload-optimizer-during-inference"),
    both("--rl-offload-kv-cache-during-training"),
    both("--rl-remove-kv-cache-during-training"),
    both("--rl-reset-cuda-graphs"),
    both("--rl-partial-rollouts"),
    both("--rl-inference-logprobs-is-correction"),
    val("--rl-importance-sampling-truncation-coef", float),
    both("--rl-calculate-intra-group-similarity"),
    on("--rl-use-sequence-packing"),
    val("--rl-sequence-packing-bin-size", int, 8192),
    val("--rl-sequence-packing-algo", str, "fifo", choices=("fifo", "round-robin")),
]

_TRAINING = [
    val("--micro-batch-size", int),
    val("--batch-size", int),
    val("--global-batch-size", int),
    val("--rampup-batch-size", str, nargs="*"),
    on("--decrease-batch-size-if-needed"),
    on("--recompute-activations"),
    val("--recompute-granularity", str, choices=("full", "selective")),
    off("--no-check-for-nan-in-loss-and-grad", "check_for_nan_in_loss_and_grad"),
    on("--check-for-spiky-loss"),
    on("--check-for-large-grads"),
    on("--distribute-saved-activations"),
    val("--recompute-method", str, choices=("uniform", "block")),
    val("--recompute-num-layers", int),
    val("--recompute-modules", str, nargs="*"),
    val("--cpu-offloading-num-layers", int, 0),
    off("--no-clone-scatter-output-in-embedding", "clone_scatter_output_in_embedding"),
    on("--profile"),
    val("--profile-step-start", int, 10),
    val("--profile-step-end", int, 12),
    val("--iterations-to-skip", int, [], nargs="+"),
    val("--result-rejected-tracker-filename", str),
    off("--disable-gloo-process-groups", "enable_gloo_process_groups"),
    on("--use-pytorch-profiler"),
    val("--profile-ranks", int, [0], nargs="+"),
    on("--record-memory-history"),
    val("--memory-snapshot-path", str, "snapshot.pickle"),
    on("--tp-comm-overlap"),
    val("--tp-comm-overlap-cfg", str),
    off("--disable-tp-comm-overlap-ag", "tp_comm_overlap_ag"),
    off("--disable-tp-comm-overlap-rs", "tp_comm_overlap_rs"),
    on("--tp-comm-overlap-rs-dgrad"),
    off("--disable-tp-comm-bulk-dgrad", "tp_comm_bulk_dgrad"),
    off("--disable-tp-comm-bulk-wgrad", "tp_comm_bulk_wgrad"),
    val("--tp-comm-bootstrap-backend", str, "nccl", choices=("nccl", "mpi", "gloo")),
    on("--use-cpu-initialization", default=None),
    val("--empty-unused-memory-level", int, 0, choices=(0, 1, 2)),
    on("--deterministic-mode"),
    val("--check-weight-hash-across-dp-replicas-interval", int),
    on("--calculate-per-token-loss"),
    val("--train-sync-interval", int),
    on("--checkpoint-activations"),  # deprecated in Megatron
    val("--train-iters", int),
    val("--train-samples", int),
    val("--log-interval", int, 100),
    val("--exit-interval", int),
    val("--exit-duration-in-mins", int),
    on("--exit-signal-handler"),
    val("--tensorboard-dir", str),
    off("--no-masked-softmax-fusion", "masked_softmax_fusion"),
    off("--no-bias-gelu-fusion", "bias_gelu_fusion"),
    off("--no-bias-swiglu-fusion", "bias_swiglu_fusion"),
    on("--use-fused-weighted-squared-relu"),
    off("--no-bias-dropout-fusion", "bias_dropout_fusion"),
    off("--no-rope-fusion", "apply_rope_fusion"),
    val("--rope-type", str, choices=("rope", "yarn")),
    on("--cross-entropy-loss-fusion"),
    val("--cross-entropy-fusion-impl", str, "native", choices=("native", "te")),
    on("--use-flash-attn"),
    off("--disable-bias-linear", "add_bias_linear"),
    on("--add-qkv-bias"),
    val("--optimizer", str, "adam", choices=("adam", "sgd", "muon", "dist_muon")),
    on("--optimizer-cpu-offload"),
    val("--optimizer-offload-fraction", float, 1.0),
    on("--use-torch-optimizer-for-cpu-offload"),
    on("--overlap-cpu-optimizer-d2h-h2d"),
    val("--dump-param-to-param-group-map", str),
    off("--no-pin-cpu-grads", "pin_cpu_grads"),
    off("--no-pin-cpu-params", "pin_cpu_params"),
    val("--dataloader-type", str, choices=("single", "cyclic", "external")),
    off("--no-async-tensor-model-parallel-allreduce", "async_tensor_model_parallel_allreduce"),
    on("--no-persist-layer-norm"),
    on("--sequence-parallel"),
    off("--no-gradient-accumulation-fusion", "gradient_accumulation_fusion"),
    on("--use-mcore-models", "deprecated_use_mcore_models"),
    on("--use-legacy-models"),
    on("--manual-gc"),
    val("--manual-gc-interval", int, 0),
    off("--no-manual-gc-eval", "manual_gc_eval"),
    off("--disable-tp-comm-split-ag", "tp_comm_split_ag"),
    off("--disable-tp-comm-split-rs", "tp_comm_split_rs"),
    val("--pipeline-model-parallel-comm-backend", str, choices=("nccl", "ucc")),
    val("--high-priority-stream-groups", str, [], nargs="*"),
    on("--use-te-activation-func"),
]

_RERUN_MACHINE = [
    val("--error-injection-rate", int, 0),
    val("--error-injection-type", str, "transient_error",
        choices=("correct_result", "transient_error", "persistent_error")),
    val("--rerun-mode", str, "validate_results", choices=("disabled", "validate_results", "report_stats")),
]

_INITIALIZATION = [
    val("--seed", int, 1234),
    on("--data-parallel-random-init"),
    val("--init-method-std", float, 0.02),
    val("--embedding-init-method-std", float),
    on("--init-method-xavier-uniform"),
]

_LEARNING_RATE = [
    val("--lr", float),
    val("--lr-decay-style", str, "linear", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD")),
    val("--lr-wsd-decay-style", str, "exponential", choices=("exponential", "linear", "cosine", "minus_sqrt")),
    val("--lr-decay-iters", int),
    val("--lr-decay-samples", int),
    val("--lr-wsd-decay-samples", int),
    val("--lr-wsd-decay-iters", int),
    val("--lr-warmup-fraction", float),
    val("--lr-warmup-iters", int, 0),
    val("--lr-warmup-samples", int, 0),
    val("--lr-warmup-init", float, 0.0),
    val("--warmup", int),  # deprecated in Megatron
    val("--min-lr", float, 0.0),
    on("--override-opt_param-scheduler", "override_opt_param_scheduler",
       aliases=("--override-opt-param-scheduler",)),
    on("--use-checkpoint-opt_param-scheduler", "use_checkpoint_opt_param_scheduler",
       aliases=("--use-checkpoint-opt-param-scheduler",)),
    val("--decoupled-lr", float),
    val("--decoupled-min-lr", float),
]

_MIXED_PRECISION = [
    on("--fp16"),
    on("--bf16"),
    on("--grad-reduce-in-bf16"),
    val("--loss-scale", float),
    val("--initial-loss-scale", float, 2 ** 32),
    val("--min-loss-scale", float, 1.0),
    val("--loss-scale-window", float, 1000),
    val("--hysteresis", int, 2),
    on("--fp32-residual-connection"),
    on("--apply-query-key-layer-scaling"),
    on("--attention-softmax-in-fp32"),
    on("--accumulate-allreduce-grads-in-fp32"),
    on("--fp16-lm-cross-entropy"),
    on("--disable-bf16-reduced-precision-matmul"),
    on("--reuse-grad-buf-for-mxfp8-param-ag"),
]

_CHECKPOINTING = [
    val("--save", str),
    val("--save-interval", int, aliases=("--persistent-save-interval",)),
    val("--save-retain-interval", int),
    on("--no-save-optim", default=None),
    on("--no-save-rng", default=None),
    val("--load", str),
    on("--no-load-optim", default=None),
    on("--load-main-params-from-ckpt", default=None),
    on("--no-load-rng", default=None),
    off("--no-strict-fsdp-dtensor-load", "strict_fsdp_dtensor_load"),
    val("--non-persistent-save-interval", int),
    val("--non-persistent-ckpt-type", str, choices=("global", "local", "in_memory", None)),
    val("--non-persistent-global-ckpt-dir", str),
    val("--non-persistent-local-ckpt-dir", str),
    val("--non-persistent-local-ckpt-algo", str, "fully_parallel", choices=("fully_parallel", "atomic")),
    on("--finetune"),
    val("--pretrained-checkpoint", str),
    val("--ckpt-step", int),
    off("--no-initialization", "perform_initialization"),
    on("--use-checkpoint-args"),
    on("--use-mp-args-from-checkpoint-args"),
    off("--no-use-tokenizer-model-from-checkpoint-args", "use_tokenizer_model_from_checkpoint_args"),
    on("--exit-on-missing-checkpoint"),
    on("--use-dist-ckpt", "use_dist_ckpt_deprecated"),
    on("--use-persistent-ckpt-worker"),
    on("--auto-detect-ckpt-format"),
    val("--dist-ckpt-format", str, dest="dist_ckpt_format_deprecated"),
    # mindtron adds its own format, "safetensors", to Megatron's choices.
    val("--ckpt-format", str, "torch_dist",
        choices=("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor", "safetensors")),
    val("--ckpt-convert-format", str, choices=("torch", "torch_dist", "zarr")),
    val("--ckpt-convert-save", str),
    on("--ckpt-convert-update-legacy-dist-opt-format"),
    on("--ckpt-fully-parallel-save", "ckpt_fully_parallel_save_deprecated"),
    off("--no-ckpt-fully-parallel-save", "ckpt_fully_parallel_save"),
    on("--async-save", default=None),
    on("--ckpt-fully-parallel-load"),
    on("--ckpt-assume-constant-structure"),
    val("--dist-ckpt-strictness", str, "assume_ok_unexpected",
        choices=("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                 "return_unexpected", "return_all", "ignore_all")),
    on("--dist-ckpt-save-pre-mcore-014"),
    on("--dist-ckpt-optim-fully-reshardable"),
    on("--distrib-optim-fully-reshardable-mem-efficient"),
]

_DISTRIBUTED = [
    val("--tensor-model-parallel-size", int, 1),
    val("--pipeline-model-parallel-size", int, 1),
    val("--decoder-first-pipeline-num-layers", int),
    val("--decoder-last-pipeline-num-layers", int),
    val("--pipeline-model-parallel-layout", str),
    val("--model-parallel-size", int),  # deprecated in Megatron
    val("--num-layers-per-virtual-pipeline-stage", int),
    val("--num-virtual-stages-per-pipeline-rank", int),
    val("--microbatch-group-size-per-virtual-pipeline-stage", int, dest="microbatch_group_size_per_vp_stage"),
    off("--no-overlap-p2p-communication", "overlap_p2p_comm"),
    on("--overlap-p2p-communication-warmup-flush", "overlap_p2p_comm_warmup_flush"),
    val("--distributed-backend", str, "nccl", choices=("nccl", "gloo")),
    val("--distributed-timeout-minutes", int, 10),
    val("--distributed-timeout-seconds-after-init", int),
    on("--overlap-grad-reduce"),
    on("--defer-embedding-wgrad-compute"),
    val("--wgrad-deferral-limit", int, 0),
    off("--no-align-grad-reduce", "align_grad_reduce"),
    val("--ddp-num-buckets", int),
    val("--ddp-bucket-size", int),
    on("--ddp-pad-buckets-for-high-nccl-busbw"),
    on("--ddp-reduce-scatter-with-fp32-accumulation"),
    on("--ddp-average-in-collective"),
    on("--overlap-param-gather"),
    on("--overlap-param-gather-with-optimizer-step"),
    off("--no-align-param-gather", "align_param_gather"),
    off("--no-scatter-gather-tensors-in-pipeline", "scatter_gather_tensors_in_pipeline"),
    on("--use-ring-exchange-p2p"),
    # Megatron's default is the LOCAL_RANK environment variable.
    val("--local-rank", int, int(os.getenv("LOCAL_RANK", "0"))),
    val("--lazy-mpu-init", truthy_text),
    on("--account-for-embedding-in-pipeline-split"),
    on("--account-for-loss-in-pipeline-split"),
    on("--use-distributed-optimizer"),
    on("--use-nccl-ub", "nccl_ub"),
    on("--disable-symmetric-registration"),
    on("--use-sharp"),
    val("--sharp-enabled-group", str, choices=("dp", "dp_replica")),
    on("--use-megatron-fsdp"),
    on("--init-model-with-meta-device"),
    val("--data-parallel-sharding-strategy", str, "no_shard",
        choices=("no_shard", "optim", "optim_grads", "optim_grads_params")),
    off("--no-gradient-reduce-div-fusion", "gradient_reduce_div_fusion"),
    on("--fsdp-double-buffer"),
    val("--suggested-communication-unit-size", int),
    on("--keep-fp8-transpose-cache"),
    on("--enable-full-sharding-in-hsdp"),
    val("--num-distributed-optimizer-instances", int, 1),
    on("--use-torch-fsdp2"),
    off("--torch-fsdp2-no-reshard-after-forward", "torch_fsdp2_reshard_after_forward"),
    val("--context-parallel-size", int, 1),
    val("--cp-comm-type", str, ["p2p"], nargs="+"),
    val("--hierarchical-context-parallel-sizes", int, nargs="+"),
    val("--nccl-communicator-config-path", str),
    on("--use-tp-pp-dp-mapping"),
    on("--replication"),
    val("--replication-jump", int),
    val("--replication-factor", int, 2),
]

_VALIDATION = [
    on("--full-validation"),
    on("--multiple-validation-sets"),
    val("--eval-iters", int, 100),
    val("--eval-interval", int, 1000),
    on("--test-mode"),
    on("--skip-train"),
]

_TOKENIZER = [
    val("--vocab-size", int),
    val("--padded-vocab-size", int),
    val("--vocab-file", str),
    val("--merge-file", str),
    val("--vocab-extra-ids", int, 0),
    val("--tokenizer-type", str, choices=(
        "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
        "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
        "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")),
    val("--tokenizer-model", str),
    val("--tokenizer-metadata", str),
    val("--tiktoken-pattern", str),
    val("--tiktoken-num-special-tokens", int, 1000),
    val("--tiktoken-special-tokens", str, nargs="+"),
    on("--legacy-tokenizer"),
    on("--trust-remote-code"),
]

_DATA = [
    val("--data-path", str, nargs="*"),
    val("--split", str),
    val("--train-data-path", str, nargs="*"),
    val("--valid-data-path", str, nargs="*"),
    val("--test-data-path", str, nargs="*"),
    val("--data-args-path", str),
    val("--per-split-data-args-path", str),
    val("--data-cache-path", str),
    off("--no-mmap-bin-files", "mmap_bin_files"),
    on("--mock-data"),
    val("--seq-length", int),
    val("--encoder-seq-length", int),
    val("--decoder-seq-length", int),
    val("--retriever-seq-length", int, 256),
    val("--sample-rate", float, 1.0),
    val("--mask-prob", float, 0.15),
    val("--short-seq-prob", float, 0.1),
    val("--num-workers", int, 2),
    on("--reset-position-ids"),
    on("--reset-attention-mask"),
    on("--eod-mask-loss"),
    off("--no-create-attention-mask-in-dataloader", "create_attention_mask_in_dataloader"),
    val("--num-dataset-builder-threads", int, 1),
    val("--object-storage-cache-path", str),
    val("--mid-level-dataset-surplus", float, 0.005),
    on("--allow-ambiguous-pad-tokens"),
]

_AUTORESUME = [
    on("--adlr-autoresume"),
    val("--adlr-autoresume-interval", int, 1000),
]

_BIENCODER = [
    val("--ict-head-size", int),
    val("--biencoder-projection-dim", int, 0),
    on("--biencoder-shared-query-context-model"),
    val("--ict-load", str),
    val("--bert-load", str),
    val("--titles-data-path", str),
    val("--query-in-block-prob", float, 0.1),
    on("--use-one-sent-docs"),
    val("--evidence-data-path", str),
    val("--retriever-report-topk-accuracies", int, [], nargs="+"),
    on("--retriever-score-scaling"),
    val("--block-data-path", str),
    val("--embedding-path", str),
    val("--indexer-batch-size", int, 128),
    val("--indexer-log-interval", int, 1000),
]

_VISION = [
    val("--num-classes", int, 1000),
    val("--img-h", int, 224),
    val("--img-w", int, 224),
    val("--num-channels", int, 3),
    val("--patch-dim", int, 16),
    val("--classes-fraction", float, 1.0),
    val("--data-per-class-fraction", float, 1.0),
    off("--no-data-sharding", "data_sharding"),
    val("--head-lr-mult", float, 1.0),
    on("--vision-pretraining"),
    val("--vision-pretraining-type", str, "classify", choices=("classify", "inpaint", "dino")),
    val("--vision-backbone-type", str, "vit", choices=("vit", "mit", "swin")),
    val("--swin-backbone-type", str, "tiny", choices=("tiny", "base", "h3")),
    val("--mask-type", str, "random", choices=("random", "row")),
    val("--mask-factor", float, 1.0),
    val("--iter-per-epoch", int, 1250),
    val("--dino-local-img-size", int, 96),
    val("--dino-local-crops-number", int, 10),
    val("--dino-head-hidden-size", int, 2048),
    val("--dino-bottleneck-size", int, 256),
    val("--dino-freeze-last-layer", float, 1),
    on("--dino-norm-last-layer"),
    val("--dino-warmup-teacher-temp", float, 0.04),
    val("--dino-teacher-temp", float, 0.07),
    val("--dino-warmup-teacher-temp-epochs", int, 30),
    on("--qk-layernorm"),
    on("--qk-l2-norm"),
]

_MOE = [
    val("--expert-model-parallel-size", int, 1),
    val("--expert-tensor-parallel-size", int),
    val("--num-experts", int),
    val("--moe-layer-freq", layer_freq, 1),
    val("--moe-ffn-hidden-size", int),
    val("--moe-shared-expert-intermediate-size", int),
    on("--moe-shared-expert-overlap"),
    on("--moe-grouped-gemm"),
    on("--moe-use-legacy-grouped-gemm"),
    on("--moe-layer-recompute"),
    on("--moe-extended-tp"),
    on("--moe-use-upcycling"),
    val("--moe-router-load-balancing-type", str, "aux_loss", nargs="+",
        choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")),
    val("--moe-router-dtype", str, choices=("fp32", "fp64")),
    on("--moe-router-fusion"),
    val("--moe-router-score-function", str, "softmax", choices=("softmax", "sigmoid")),
    val("--moe-router-topk", int, 2),
    on("--moe-router-pre-softmax"),
    val("--moe-router-num-groups", int),
    val("--moe-router-group-topk", int),
    val("--moe-router-topk-scaling-factor", float),
    on("--moe-router-enable-expert-bias"),
    val("--moe-router-bias-update-rate", float, 1e-3),
    on("--moe-router-force-load-balancing"),
    on("--moe-router-padding-for-fp8"),
    val("--moe-aux-loss-coeff", float, 0.0, nargs="+"),
    val("--moe-z-loss-coeff", float),
    val("--moe-input-jitter-eps", float),
    on("--moe-per-layer-logging"),
    val("--moe-token-dispatcher-type", str, "allgather", choices=("allgather", "alltoall", "flex")),
    on("--moe-enable-deepep"),
    val("--moe-deepep-num-sms", int, 20),
    on("--moe-permute-fusion"),
    val("--moe-expert-capacity-factor", float),
    on("--moe-pad-expert-input-to-capacity"),
    val("--moe-token-drop-policy", str, "probs", choices=("probs", "position")),
    on("--moe-apply-probs-on-input"),
    on("--overlap-moe-expert-parallel-comm"),
    on("--delay-wgrad-compute"),
    val("--moe-upcycling-granularity", int, 1),
    on("--moe-pad-experts-for-cuda-graph-inference"),
]

_MLA = [
    val("--q-lora-rank", int),
    val("--kv-lora-rank", int, 32),
    val("--qk-head-dim", int, 128),
    val("--qk-pos-emb-head-dim", int, 64),
    val("--v-head-dim", int, 128),
    val("--rotary-scaling-factor", float, 1.0),
    val("--mscale", float, 1.0),
    val("--mscale-all-dim", float, 0.0),
    on("--cache-mla-latents"),
]

_HETEROGENEOUS = [
    val("--heterogeneous-layers-config-path", str),
    val("--heterogeneous-layers-config-encoded-json", str),
]

_EXPERIMENTAL = [
    on("--enable-experimental"),
    val("--spec", str, nargs="*"),
    val("--hybrid-attention-ratio", float, 0.0),
    val("--hybrid-mlp-ratio", float, 0.0),
    val("--hybrid-override-pattern", str),
    val("--mamba-state-dim", int, 128),
    val("--mamba-head-dim", int, 64),
    val("--mamba-num-groups", int, 8),
    val("--mamba-num-heads", int),
    on("--is-hybrid-model"),
    on("--disable-mamba-mem-eff-path"),
    # mindtron also accepts --config for the YAML file (document 002 reads its configuration from YAML).
    val("--yaml-cfg", str, aliases=("--config",)),
    on("--use-precision-aware-optimizer"),
    val("--main-grads-dtype", str, "fp32", choices=("fp32", "bf16")),
    val("--main-params-dtype", str, "fp32", choices=("fp32", "fp16")),
    val("--exp-avg-dtype", str, "fp32", choices=("fp32", "fp16", "bf16", "fp8")),
    val("--exp-avg-sq-dtype", str, "fp32", choices=("fp32", "fp16", "bf16", "fp8")),
]

_MSC = [
    off("--disable-msc", "enable_msc"),
]

# Megatron registers these two only when NVIDIA's "kitchen" quantization package is installed.
_KITCHEN = [
    val("--kitchen-config-file", str),
    val("--kitchen-recipe-number", int),
]

_SFT = [
    on("--sft"),
    val("--sft-tokenizer-prompt-format", str, "nemotron-h-aligned"),
]


# ---------------------------------------------------------------------------------------------------------
# mindtron's own options: the names of document 002's mapping tables that Megatron has no flag for, and
# documents 000/001's clipping, accumulation and adaptive loss-scale parameters. Defaults follow the
# mindtron config fields they map to (None where mindtron derives the value, see arguments.validate_args).
# ---------------------------------------------------------------------------------------------------------
def layer_list(text):
    """--num-layer-list: "4,4,4,2", "[4,4,4,2]" or nested per virtual stage "[[2,2],[2,2]]"."""
    if text is None or isinstance(text, list):
        return text
    stripped = str(text).strip()
    if not stripped:
        return None
    if not stripped.startswith("["):
        stripped = f"[{stripped}]"
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"--num-layer-list {text!r}: write counts like 4,4,4,2 or "
                                         "[[2,2],[2,2]] (one list per virtual stage)") from None
    return [list(v) if isinstance(v, (list, tuple)) else v for v in value]


_CP_ALGOS = {"ring": "ring", "megatron_cp_algo": "ring", "ulysses": "ulysses", "ulysses_cp_algo": "ulysses",
             "hybrid": "hybrid", "hybrid_cp_algo": "hybrid"}


def cp_algo(text) -> str:
    """"ring", "ulysses" or "hybrid"; MindSpeed's names (megatron_cp_algo, ulysses_cp_algo,
    hybrid_cp_algo) are read as the same algorithms."""
    try:
        return _CP_ALGOS[str(text)]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown context-parallel algorithm {text!r}; use ring, ulysses or "
                                         "hybrid") from None


_DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")

_MINDTRON_MODEL = [
    on("--add-dense-bias"),
    on("--use-sandwich-norm"),
    val("--attn-post-norm-scale", float, 1.0),
    val("--ffn-post-norm-scale", float, 1.0),
    val("--pre-tockens", int, 65536),
    val("--next-tockens", int, 0),
    val("--shape-order", str, "SBH", choices=("SBH", "BSH", "BSND", "BNSD")),
    val("--params-dtype", str, choices=_DTYPE_NAMES),
    val("--compute-dtype", str, choices=_DTYPE_NAMES),
    val("--embedding-dtype", str, choices=_DTYPE_NAMES),
    on("--use-fused-swiglu"),
    on("--use-fused-rope"),
    on("--use-fused-rmsnorm"),
    val("--hidden-act", str, choices=("gelu", "gelu_tanh", "swiglu", "squared_relu", "silu", "quick_geglu")),
]

_MINDTRON_TRAINING = [
    on("--resume-training"),
    on("--resume-crc-check"),
    val("--ckpt-prefix", str, "network"),
    val("--keep-checkpoint-max", int),
    switch("--wrap-with-ddp", True),
    val("--bucket-size", int),
    on("--enable-mem-align"),
    switch("--delay-grad-reduce", True),
    on("--new-dataset"),
    val("--profile-save-path", str, "./profile"),
    val("--profile-level", str, "level0", choices=("level0", "level1", "level2")),
    on("--profile-with-stack"),
    on("--profile-memory"),
    val("--profile-framework", str, choices=("all", "time")),
    on("--profile-communication"),
    on("--profile-parallel-strategy"),
    val("--profile-aicore-metrics", int, 0),
    on("--profile-l2-cache"),
    on("--profile-hbm-ddr"),
    on("--profile-pcie"),
    on("--profile-data-process"),
    on("--profile-data-simplification"),
    switch("--profile-op-time", True),
    on("--profile-offline-analyse"),
    val("--profile-dynamic-profiler-config-path", str, ""),
    # documents 000/001: clipping, accumulation, adaptive loss scaling
    on("--use-clip-grad"),
    val("--max-grad-norm", float),
    val("--gradient-accumulation-steps", int),
    on("--use-adaptive-loss-scale"),
    val("--loss-scale-value", float),
    val("--scale-factor", float, 2.0),
    val("--scale-window", int),
    val("--max-scale-window", int, 1000),
    val("--min-scale-window", int, 20),
]

_MINDTRON_DATASET = [
    val("--pad-token-id", int),
    val("--eos-token-id", int),
    switch("--drop-remainder", True),
    val("--micro-batch-num", int),
]

_MINDTRON_PARALLEL = [
    val("--context-parallel-algo", cp_algo, "ring"),
    val("--ulysses-degree-in-cp", int),
    val("--virtual-pipeline-model-parallel-size", int),
    val("--num-layer-list", layer_list),
    on("--recompute"),
    on("--select-recompute"),
    on("--select-comm-recompute"),
]


def _group(title: str, flags: List[Flag]) -> List[Flag]:
    return [Flag(f.options, f.dest, f.action, f.type, f.default, f.choices, f.nargs, f.const, title)
            for f in flags]


# Megatron's registration order, then mindtron's additions.
GROUPS: Dict[str, List[Flag]] = {title: _group(title, flags) for title, flags in (
    ("network size", _NETWORK_SIZE), ("regularization", _REGULARIZATION), ("training", _TRAINING),
    ("rl", _RL), ("initialization", _INITIALIZATION), ("learning rate", _LEARNING_RATE),
    ("checkpointing", _CHECKPOINTING), ("mixed precision", _MIXED_PRECISION), ("distributed", _DISTRIBUTED),
    ("validation", _VALIDATION), ("data and dataloader", _DATA), ("tokenizer", _TOKENIZER),
    ("autoresume", _AUTORESUME), ("biencoder", _BIENCODER), ("vision", _VISION), ("moe", _MOE), ("mla", _MLA),
    ("heterogeneous architecture", _HETEROGENEOUS), ("logging", _LOGGING), ("straggler", _STRAGGLER),
    ("workload inspector", _WORKLOAD_INSPECTOR), ("inference", _INFERENCE),
    ("Transformer-Engine", _TRANSFORMER_ENGINE), ("retro", _RETRO), ("experimental", _EXPERIMENTAL),
    ("one logger", _ONE_LOGGER), ("In-process restart", _INPROCESS_RESTART), ("ft_package", _FT_PACKAGE),
    ("config logger", _CONFIG_LOGGER), ("rerun engine", _RERUN_MACHINE), ("msc", _MSC), ("kitchen", _KITCHEN),
    ("sft", _SFT),
    ("mindtron: model (document 002)", _MINDTRON_MODEL),
    ("mindtron: training (documents 000-002)", _MINDTRON_TRAINING),
    ("mindtron: dataset (document 002)", _MINDTRON_DATASET),
    ("mindtron: parallel (document 002)", _MINDTRON_PARALLEL),
)}

MINDTRON_GROUPS = tuple(title for title in GROUPS if title.startswith("mindtron:"))
ALL_FLAGS: Tuple[Flag, ...] = tuple(f for flags in GROUPS.values() for f in flags)
FLAGS_BY_OPTION: Dict[str, Flag] = {o: f for f in ALL_FLAGS for o in f.all_options}
# Several options may share one dest (Megatron's --inference-max-requests/--inference-max-batch-size,
# mindtron's --use-fused-rope); the first registered one is the dest's flag, as argparse's defaults go.
FLAGS_BY_DEST: Dict[str, Flag] = {}
for _f in ALL_FLAGS:
    FLAGS_BY_DEST.setdefault(_f.dest, _f)
MEGATRON_DESTS = frozenset(f.dest for f in ALL_FLAGS if not f.group.startswith("mindtron:"))


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every flag of the table on `parser`, one argparse group per Megatron group."""
    for title, flags in GROUPS.items():
        group = parser.add_argument_group(title=title)
        for flag in flags:
            group.add_argument(*flag.options, **flag.kwargs())
    return parser


def build_parser(parser_class=argparse.ArgumentParser, **parser_kwargs) -> argparse.ArgumentParser:
    """A parser with all of Megatron's flags and mindtron's additions (no abbreviations, as Megatron)."""
    parser_kwargs.setdefault("description", "mindtron (Megatron-LM arguments)")
    parser_kwargs.setdefault("allow_abbrev", False)
    return add_flags(parser_class(**parser_kwargs))
