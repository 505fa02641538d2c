"""The model a checkpoint holds (layers, widths, heads, activation, norm, positions, vocabulary), independent
of its parallel layout, and its translation from and to Megatron's stored arguments.

Megatron keeps its argument namespace in every checkpoint (`args`); mindtron keeps its TransformerConfig in
meta.json (`args.model_config`). Both become a `ModelSpec`. Command-line flags (Megatron's names:
`--num-layers`, `--swiglu`, `--disable-bias-linear`, ...) override the stored values before the translation,
so derived values (head width, SwiGLU's ffn size) follow them as Megatron would derive them.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mindtron.convert.safe_pickle import plain_value
from mindtron.legacy_model.config import TransformerConfig, pad_vocab_size
from mindtron.parallel_core.moe.config import MoEConfig

# Megatron argument names (dests) the converter reads; an override of any other flag is reported as ignored.
MODEL_ARGS = (
    "num_layers", "hidden_size", "num_attention_heads", "group_query_attention", "num_query_groups", "kv_channels",
    "ffn_hidden_size", "padded_vocab_size", "vocab_size", "make_vocab_size_divisible_by", "tokenizer_type",
    "seq_length", "encoder_seq_length", "max_position_embeddings", "position_embedding_type",
    "use_rotary_position_embeddings", "add_position_embedding", "rotary_base", "rotary_percent",
    "rotary_interleaved", "use_rope_scaling", "normalization", "norm_epsilon", "layernorm_epsilon",
    "apply_layernorm_1p", "swiglu", "squared_relu", "openai_gelu", "onnx_safe", "hidden_act", "bias_gelu_fusion",
    "add_bias_linear", "add_qkv_bias", "add_dense_bias", "untie_embeddings_and_output_weights",
    "apply_query_key_layer_scaling", "use_sandwich_norm", "attn_post_norm_scale", "ffn_post_norm_scale",
    "init_method_std", "attention_dropout", "hidden_dropout", "num_experts", "qk_layernorm",
    "multi_latent_attention", "layernorm_zero_centered_gamma",
    # Mixture of Experts (MoEConfig's fields are Megatron's dests)
    "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_topk", "moe_router_score_function",
    "moe_router_pre_softmax", "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_dtype",
    "moe_router_force_load_balancing", "moe_input_jitter_eps", "moe_router_load_balancing_type",
    "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_expert_capacity_factor", "moe_token_drop_policy",
    "moe_pad_expert_input_to_capacity", "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_apply_probs_on_input",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_overlap", "moe_shared_expert_gate",
    "moe_layer_recompute", "moe_per_layer_logging", "moe_mlp_glu_interleave_size",
    "moe_shared_expert_glu_interleave_size", "moe_latent_size", "moe_router_force_biased",
    "activation_func_clamp_value", "glu_linear_offset",
)
# MoEConfig fields with no Megatron flag (mindtron's own): kept from a mindtron checkpoint's model_config.
_MINDTRON_MOE_FIELDS = ("first_k_dense_replace", "enable_gmm_safe_tokens")
# Features mindtron's GPT does not have: a checkpoint that uses one cannot be converted faithfully.
_UNSUPPORTED = {
    "qk_layernorm": "query/key layer norms (--qk-layernorm)",
    "multi_latent_attention": "multi-latent attention (--multi-latent-attention)",
    "apply_layernorm_1p": "LayerNorm with weights stored as 1 + w (--apply-layernorm-1p)",
    # Megatron-Core's dest for --apply-layernorm-1p (the parser's since core_r0.19.0 and in mcore checkpoints)
    "layernorm_zero_centered_gamma": "LayerNorm with weights stored as 1 + w (--apply-layernorm-1p)",
    "rotary_interleaved": "interleaved rotary embeddings (--rotary-interleaved)",
    "use_rope_scaling": "Llama-3.1 rope scaling (--use-rope-scaling)",
    "moe_mlp_glu_interleave_size": "experts with interleaved GLU rows (--moe-mlp-glu-interleave-size)",
    "moe_shared_expert_glu_interleave_size": "a shared expert with interleaved GLU rows "
                                             "(--moe-shared-expert-glu-interleave-size)",
    "moe_latent_size": "MoE experts in a latent space (--moe-latent-size)",
    "moe_router_force_biased": "a router forced towards biased experts (--moe-router-force-biased)",
    "activation_func_clamp_value": "clamped GLU activations (--activation-func-clamp-value)",
    "glu_linear_offset": "an offset on the GLU's linear half (--glu-linear-offset)",
}


def _value(args: Mapping[str, Any], name: str, default=None):
    value = args.get(name)
    return default if value is None else value


def config_fields_from_megatron(args: Mapping[str, Any]) -> Dict[str, Any]:
    """TransformerConfig keyword arguments (without vocab_size) from Megatron-named arguments."""
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if args.get(n) is None]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ValueError(f"the checkpoint's stored arguments do not give {flags}; pass them on the command line")
    for name, what in _UNSUPPORTED.items():
        if args.get(name):
            raise ValueError(f"the checkpoint uses {what}, which mindtron's GPT does not implement; it cannot be "
                             "converted (if the stored argument is wrong, override it on the command line)")
    hidden, heads = int(args["hidden_size"]), int(args["num_attention_heads"])
    gqa = bool(args.get("group_query_attention")) and args.get("num_query_groups") is not None
    derived_act = ("swiglu" if args.get("swiglu") else "squared_relu" if args.get("squared_relu")
                   else "gelu_tanh" if args.get("openai_gelu") else "gelu")
    act = args.get("hidden_act") or derived_act
    if derived_act != "gelu" and act != derived_act:
        act = derived_act  # Megatron's switch wins over a stored mindtron name
    kv = args.get("kv_channels")
    if kv is None:
        if hidden % heads:
            raise ValueError(f"--hidden-size {hidden} is not divisible by --num-attention-heads {heads}; "
                             "give --kv-channels")
        kv = hidden // heads
    ffn = args.get("ffn_hidden_size")
    if ffn is None:
        ffn = int(hidden * 4 * 2 / 3 / 64) * 64 if act == "swiglu" else 4 * hidden
    positions = _value(args, "position_embedding_type", "learned_absolute")
    if args.get("use_rotary_position_embeddings"):
        positions = "rope"
    if positions == "learned_absolute" and args.get("add_position_embedding") is False:
        positions = "none"
    if positions not in ("learned_absolute", "rope", "none"):
        raise ValueError(f"--position-embedding-type {positions!r} is not supported by mindtron (learned_absolute, "
                         "rope, none)")
    seq = args.get("seq_length") or args.get("encoder_seq_length")  # else: from the position table (config())
    add_bias = bool(_value(args, "add_bias_linear", True))
    fields = dict(
        num_layers=int(args["num_layers"]), hidden_size=hidden, num_attention_heads=heads,
        group_query_attention=gqa, num_query_groups=int(args["num_query_groups"]) if gqa else None,
        kv_channels=int(kv), ffn_hidden_size=int(ffn), seq_length=int(seq) if seq else None,
        max_position_embeddings=args.get("max_position_embeddings"), position_embedding_type=positions,
        rotary_base=float(_value(args, "rotary_base", 10000)), rotary_percent=float(_value(args, "rotary_percent", 1.0)),
        normalization=_value(args, "normalization", "LayerNorm"),
        norm_epsilon=float(_value(args, "norm_epsilon", _value(args, "layernorm_epsilon", 1e-5))),
        hidden_act=act, bias_gelu_fusion=bool(_value(args, "bias_gelu_fusion", True)) and not args.get("onnx_safe"),
        add_bias_linear=add_bias, qkv_has_bias=bool(args.get("add_qkv_bias")) or add_bias,
        out_proj_has_bias=bool(args.get("add_dense_bias")) or add_bias,
        untie_embeddings_and_output_weights=bool(args.get("untie_embeddings_and_output_weights")),
        apply_query_key_layer_scaling=bool(args.get("apply_query_key_layer_scaling")),
        use_sandwich_norm=bool(args.get("use_sandwich_norm")),
        attn_post_norm_scale=float(_value(args, "attn_post_norm_scale", 1.0)),
        ffn_post_norm_scale=float(_value(args, "ffn_post_norm_scale", 1.0)),
        init_method_std=float(_value(args, "init_method_std", 0.02)),
        attention_dropout_rate=float(_value(args, "attention_dropout", 0.1)),
        hidden_dropout_rate=float(_value(args, "hidden_dropout", 0.1)),
    )
    if fields["max_position_embeddings"] is None:
        fields.pop("max_position_embeddings")
    if args.get("num_experts"):
        fields["moe_config"] = moe_fields_from_megatron(args)
    return fields


def moe_fields_from_megatron(args: Mapping[str, Any]) -> Dict[str, Any]:
    """MoEConfig keyword arguments from Megatron-named arguments (its fields carry Megatron's dests)."""
    names = [f.name for f in dataclasses.fields(MoEConfig) if f.name not in _MINDTRON_MOE_FIELDS]
    fields = {name: args[name] for name in names if args.get(name) is not None}
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):  # Megatron stores lists (nargs='+')
        value = fields.get(name)
        if isinstance(value, (list, tuple)):
            fields[name] = value[0] if len(value) == 1 else list(value)
    if isinstance(fields.get("moe_layer_freq"), tuple):
        fields["moe_layer_freq"] = list(fields["moe_layer_freq"])
    if fields.get("moe_token_dispatcher_type") not in (None, "allgather", "alltoall"):
        # the flex dispatcher (DeepEP) moves tokens differently, with the same results; the converter only
        # needs a dispatcher mindtron has, for --verify and for the stored model_config
        fields["moe_token_dispatcher_type"] = "alltoall"
    fields["num_experts"] = int(fields["num_experts"])
    return fields


def megatron_args_from_config(config: TransformerConfig) -> Dict[str, Any]:
    """Megatron-named arguments describing `config` (the inverse of config_fields_from_megatron)."""
    c = config
    act = c.hidden_act
    args = dict(
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        group_query_attention=c.num_query_groups != c.num_attention_heads,
        num_query_groups=c.num_query_groups, kv_channels=c.kv_channels, ffn_hidden_size=c.ffn_hidden_size,
        seq_length=c.seq_length, encoder_seq_length=c.seq_length, max_position_embeddings=c.max_position_embeddings,
        position_embedding_type=c.position_embedding_type,
        use_rotary_position_embeddings=c.position_embedding_type == "rope",
        add_position_embedding=c.position_embedding_type == "learned_absolute",
        rotary_base=int(c.rotary_base) if float(c.rotary_base).is_integer() else c.rotary_base,
        rotary_percent=c.rotary_percent, normalization=c.normalization, norm_epsilon=c.norm_epsilon,
        swiglu=act == "swiglu", squared_relu=act == "squared_relu", openai_gelu=act == "gelu_tanh",
        bias_gelu_fusion=bool(c.bias_gelu_fusion and c.add_bias_linear and act == "gelu"),
        add_bias_linear=c.add_bias_linear, add_qkv_bias=bool(c.qkv_has_bias),
        untie_embeddings_and_output_weights=c.untie_embeddings_and_output_weights,
        apply_query_key_layer_scaling=c.apply_query_key_layer_scaling, init_method_std=c.init_method_std,
        attention_dropout=c.attention_dropout_rate, hidden_dropout=c.hidden_dropout_rate,
    )
    if act == "silu":
        args["hidden_act"] = "silu"  # no Megatron switch selects plain SiLU
    if c.out_proj_has_bias and not c.add_bias_linear:
        args["add_dense_bias"] = True
    if c.use_sandwich_norm:
        args.update(use_sandwich_norm=True, attn_post_norm_scale=c.attn_post_norm_scale,
                    ffn_post_norm_scale=c.ffn_post_norm_scale)
    args["num_experts"] = None
    if c.moe_config.enabled:
        moe = dataclasses.asdict(c.moe_config)
        args.update({k: v for k, v in moe.items() if k not in _MINDTRON_MOE_FIELDS})
        for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):  # Megatron's nargs='+' lists
            if not isinstance(args[name], list):
                args[name] = [args[name]]
    return args


@dataclass
class ModelSpec:
    """A model's settings and vocabulary, independent of any parallel layout."""

    fields: Dict[str, Any]
    """TransformerConfig keyword arguments except vocab_size."""
    source_vocab_rows: Optional[int] = None
    """Rows of the whole word embedding as stored (padded for the source's tensor-parallel size)."""
    true_vocab_size: Optional[int] = None
    """The tokenizer's vocabulary (--true-vocab-size, or NullTokenizer's --vocab-size); re-pads the table."""
    null_tokenizer_vocab: Optional[int] = None
    """NullTokenizer's --vocab-size when the source used it (0.19: that many ids; 0.15 and earlier: one more)."""
    make_vocab_size_divisible_by: int = 128
    """Megatron's padding multiple per tensor-parallel rank (--make-vocab-size-divisible-by)."""
    target_vocab_rows: Optional[int] = None
    """An explicit padded vocabulary for the output (--padded-vocab-size on the command line)."""
    tokenizer_type: Optional[str] = None
    stored_args: Dict[str, Any] = field(default_factory=dict)
    """The source's Megatron-named arguments after overrides (passed on to Megatron outputs)."""

    @property
    def gated(self) -> bool:
        """SwiGLU: the first MLP projection holds [gate; up]."""
        return self.fields.get("hidden_act") == "swiglu"

    @property
    def untied(self) -> bool:
        return bool(self.fields.get("untie_embeddings_and_output_weights"))

    def config(self, vocab_rows: Optional[int] = None, **changes) -> TransformerConfig:
        """The TransformerConfig with `vocab_rows` rows (default: the source's)."""
        rows = vocab_rows if vocab_rows is not None else self.source_vocab_rows
        if rows is None:
            raise ValueError("the vocabulary size is not known yet (no word embedding was read)")
        fields = {**self.fields, "vocab_size": int(rows), **changes}
        if fields.get("seq_length") is None:  # not stored: as long as the position table allows
            fields["seq_length"] = fields.get("max_position_embeddings") or 1024
        return TransformerConfig(**fields)

    def observe_vocab_rows(self, rows: int) -> None:
        """Take the stored word embedding's row count. A NullTokenizer source with --vocab-size N has N ids
        under Megatron-Core 0.19 and N + 1 (EOD = N) under 0.15 and earlier; the table tells which when it is
        padded for N + 1 ids and N ids would have given fewer rows."""
        self.source_vocab_rows = int(rows)
        n = self.null_tokenizer_vocab
        if n is None:
            return
        tp = int(self.stored_args.get("tensor_model_parallel_size") or 1)
        old, new = (pad_vocab_size(v, self.make_vocab_size_divisible_by, tp) for v in (n + 1, n))
        if rows == old != new:
            self.true_vocab_size = n + 1

    def vocab_rows_for(self, tp: int) -> int:
        """Rows of the word embedding for a target with tensor-parallel size `tp` (Megatron's padding)."""
        if self.target_vocab_rows is not None:
            rows = self.target_vocab_rows
            if rows % tp:
                raise ValueError(f"--padded-vocab-size {rows} is not divisible by --target-tensor-parallel-size {tp}")
        elif self.true_vocab_size is not None:
            rows = pad_vocab_size(self.true_vocab_size, self.make_vocab_size_divisible_by, tp)
        else:
            rows = self.source_vocab_rows
            if rows % tp:
                raise ValueError(
                    f"the word embedding has {rows} rows (padded for the source's tensor-parallel size), which "
                    f"--target-tensor-parallel-size {tp} does not divide; pass --true-vocab-size (the tokenizer's "
                    "vocabulary) so the table can be padded again")
        if self.true_vocab_size is not None and rows < self.true_vocab_size:
            raise ValueError(f"a padded vocabulary of {rows} rows is smaller than --true-vocab-size "
                             f"{self.true_vocab_size}")
        return rows

    def describe(self) -> str:
        """One line: the model's shape and options."""
        c = self.config()
        groups = f" ({c.num_query_groups} query groups)" if c.num_query_groups != c.num_attention_heads else ""
        tie = "untied output layer" if c.untie_embeddings_and_output_weights else "tied embeddings"
        text = (f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads{groups}, "
                f"ffn {c.ffn_hidden_size}, {c.hidden_act}, {c.normalization}, positions {c.position_embedding_type}, "
                f"{tie}, {'biases' if c.add_bias_linear else 'no linear biases'}")
        moe = c.moe_config
        if moe.enabled:
            layers = [i for i in range(c.num_layers) if moe.is_moe_layer(i, c.num_layers)]
            shared = (f", shared expert {moe.moe_shared_expert_intermediate_size}"
                      f"{' (gated)' if moe.moe_shared_expert_gate else ''}"
                      if moe.moe_shared_expert_intermediate_size else "")
            bias = ", expert bias" if moe.moe_router_enable_expert_bias else ""
            text += (f"; MoE layers {layers}: {moe.num_experts} experts of ffn {moe.moe_ffn_hidden_size}, top-"
                     f"{moe.moe_router_topk} {moe.moe_router_score_function}{bias}{shared}")
        return text

    @property
    def num_experts(self) -> Optional[int]:
        """Routed experts per MoE layer (--num-experts); None for a dense model."""
        return (self.fields.get("moe_config") or {}).get("num_experts")


def megatron_args_dict(args: Any, where: str) -> Dict[str, Any]:
    """Megatron's stored argument namespace (or a dict of it) as a dict; {} when there is none."""
    if args is None:
        return {}
    if isinstance(args, (argparse.Namespace, SimpleNamespace)):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise ValueError(f"{where}: 'args' is a {type(args).__name__}, not Megatron's argument namespace")


def spec_from_megatron_args(stored: Mapping[str, Any], overrides: Mapping[str, Any]) -> ModelSpec:
    """The ModelSpec of Megatron-named `stored` arguments with command-line `overrides` applied. Arguments
    stored as enum members (inert placeholders when read from a checkpoint) count by their values."""
    args = {k: plain_value(v) if k in MODEL_ARGS else v for k, v in stored.items()}
    args.update(overrides)
    if overrides.get("num_query_groups") is not None and "group_query_attention" not in overrides:
        args["group_query_attention"] = True  # giving the groups means grouped-query attention
    fields = config_fields_from_megatron(args)
    true_vocab = args.get("true_vocab_size")
    null_vocab = None
    if true_vocab is None and args.get("vocab_size") is not None:
        true_vocab = int(args["vocab_size"])  # the tokenizer's ids (NullTokenizer: see observe_vocab_rows)
        if args.get("tokenizer_type") == "NullTokenizer":
            null_vocab = true_vocab
    return ModelSpec(fields=fields, true_vocab_size=true_vocab, null_tokenizer_vocab=null_vocab,
                     make_vocab_size_divisible_by=int(_value(args, "make_vocab_size_divisible_by", 128)),
                     target_vocab_rows=overrides.get("padded_vocab_size"), tokenizer_type=args.get("tokenizer_type"),
                     stored_args=args)


def spec_from_mindtron_args(meta_args: Mapping[str, Any], overrides: Mapping[str, Any],
                            where: str = "meta.json") -> ModelSpec:
    """The ModelSpec of a mindtron checkpoint's meta.json `args` (its model_config) with `overrides`."""
    model_config = meta_args.get("model_config") if isinstance(meta_args, Mapping) else None
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    if model_config:
        kwargs = {k: v for k, v in model_config.items() if k in known}
        config = TransformerConfig(**kwargs)
        stored = megatron_args_from_config(config)
        stored["padded_vocab_size"] = config.vocab_size
        dataset = meta_args.get("dataset_config") or {}
        for name in ("tokenizer_type", "vocab_size"):  # the tokenizer decides the true vocabulary
            if dataset.get(name) is not None:
                stored[name] = dataset[name]
        for name, value in (meta_args.get("vocabulary") or {}).items():  # written by the converter
            if value is not None:
                stored[name] = value
    elif overrides:
        stored = {}
    else:
        raise ValueError(f"{where} holds no model_config; give the model settings on the command line "
                         "(--num-layers, --hidden-size, --num-attention-heads, ...)")
    spec = spec_from_megatron_args(stored, overrides)
    if model_config:  # mindtron-only options survive the round trip through Megatron's names
        for name in ("params_dtype", "compute_dtype", "embedding_init_dtype"):
            spec.fields.setdefault(name, model_config.get(name, "float32"))
        stored_moe = model_config.get("moe_config") or {}
        if "moe_config" in spec.fields:
            for name in _MINDTRON_MOE_FIELDS:
                if stored_moe.get(name) is not None:
                    spec.fields["moe_config"][name] = stored_moe[name]
    return spec


# --------------------------------------------------------------------------------------------------------
# Command-line overrides in Megatron's flag names
# --------------------------------------------------------------------------------------------------------
def megatron_flag_parser() -> argparse.ArgumentParser:
    """mindtron's parser of every Megatron flag, set up to report only the flags actually given."""
    from mindtron.training.arguments import build_parser

    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        action.default = argparse.SUPPRESS
    parser.add_argument("--true-vocab-size", type=int, default=argparse.SUPPRESS,
                        help="the tokenizer's vocabulary size, to pad the embedding again for the target")
    return parser


def parse_overrides(argv: Sequence[str]) -> Tuple[Dict[str, Any], List[str], List[str]]:
    """(model overrides by Megatron dest, flags given that do not describe the model, unknown arguments)."""
    parser = megatron_flag_parser()
    namespace, unknown = parser.parse_known_args(list(argv))
    given = vars(namespace)
    model = {k: v for k, v in given.items() if k in MODEL_ARGS or k == "true_vocab_size"}
    ignored = sorted("--" + k.replace("_", "-") for k in given if k not in model)
    return model, ignored, unknown


def suggest_flag(flag: str, extra: Sequence[str] = ()) -> str:
    """'; did you mean --x?' for a mistyped flag, or ''."""
    import difflib

    names = [o for a in megatron_flag_parser()._actions for o in a.option_strings] + list(extra)  # noqa: SLF001
    close = difflib.get_close_matches(flag.split("=", 1)[0], names, n=2, cutoff=0.7)
    return f"; did you mean {' or '.join(close)}?" if close else ""
