"""The model configuration (`model_config`): every transformer option of the reference mapping table.

Field names follow the `model_config.*` column of document 002's Megatron mapping; the Megatron flag each
comes from is given in its docstring. `training.arguments` fills it from flags or YAML; scripts and tests
may build it directly. Checks that need only the config run in `__post_init__`; checks that need the
tensor-parallel size run in `validate_parallel()` when a model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import mindspore as ms

from mindtron.parallel_core.moe.config import MoEConfig

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "squared_relu", "silu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = (None, "uniform", "block")
DTYPES = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16, "fp16": ms.float16,
          "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}


def to_dtype(value, what: str):
    """A MindSpore dtype from a name ("float32", "bf16", ...) or a dtype; `what` names the option."""
    if not isinstance(value, str):
        return value
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise ValueError(f"{what}: unknown dtype {value!r}; use one of {sorted(set(DTYPES))}") from None


def pad_vocab_size(orig_vocab_size: int, make_vocab_size_divisible_by: int = 128,
                   tensor_model_parallel_size: int = 1) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by x tp (`--make-vocab-size-divisible-by`)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple


@dataclass
class TransformerConfig:
    """Shape, options and precision of the GPT model (document 002's `model_config`)."""

    vocab_size: int = 50304
    """Padded vocabulary size (Megatron: padded_vocab_size, see pad_vocab_size); divisible by tp."""
    hidden_size: int = 768
    """Width of the residual stream (--hidden-size)."""
    seq_length: int = 1024
    """Tokens per sample (--seq-length)."""
    num_layers: int = 12
    """Transformer layers in the whole model, over all pipeline stages (--num-layers)."""
    num_attention_heads: int = 12
    """Query heads (--num-attention-heads)."""
    group_query_attention: bool = False
    """Use `num_query_groups` key/value heads (--group-query-attention)."""
    num_query_groups: Optional[int] = None
    """Key/value heads under GQA (--num-query-groups); defaults to the number of heads (plain MHA)."""
    kv_channels: Optional[int] = None
    """Width of one head (--kv-channels); defaults to hidden_size / num_attention_heads."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width (--ffn-hidden-size); defaults to 4h, or Megatron's SwiGLU rule int(8h/3/64)*64."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table (--max-position-embeddings); defaults to seq_length."""
    position_embedding_type: str = "learned_absolute"
    """"learned_absolute", "rope" or "none" (--position-embedding-type)."""
    use_rotary_embedding: bool = False
    """Megatron's --use-rotary-position-embeddings; True selects position_embedding_type "rope"."""
    rotary_base: float = 10000.0
    """RoPE base period (--rotary-base)."""
    rotary_percent: float = 1.0
    """Share of each head's channels that are rotated (--rotary-percent)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation (--init-method-std); output projections use std/sqrt(2 layers)."""
    normalization: str = "LayerNorm"
    """"LayerNorm" or "RMSNorm" (--normalization)."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm (--norm-epsilon)."""
    attention_dropout_rate: float = 0.1
    """Dropout on attention probabilities (--attention-dropout)."""
    hidden_dropout_rate: float = 0.1
    """Dropout on embeddings and before each residual add (--hidden-dropout)."""
    attention_softmax_in_fp32: bool = False
    """Compute the attention softmax in fp32 under fp16/bf16 compute (--attention-softmax-in-fp32)."""
    apply_query_key_layer_scaling: bool = False
    """Scale scores by 1/layer_number before softmax and back inside it (--apply-query-key-layer-scaling);
    forces the softmax into fp32, as Megatron does."""
    use_flash_attention: bool = False
    """Flash attention (--use-flash-attn): the fused kernel where the backend has it, the same maths
    through plain ops elsewhere."""
    fa_config: dict = field(default_factory=dict)
    """Flash-attention extras: pre_tokens, next_tokens (--pre-tockens/--next-tockens), input_layout
    (--shape-order). The plain path supports the causal default (pre_tokens >= seq, next_tokens 0)."""
    untie_embeddings_and_output_weights: bool = False
    """Separate output layer instead of reusing the word embedding (--untie-embeddings-and-output-weights)."""
    transformer_impl: str = "local"
    """Only "local" (Megatron's own layers) exists here (--transformer-impl)."""
    recompute_granularity: Optional[str] = None
    """None, "full" (whole layers) or "selective" (core attention only) (--recompute-granularity)."""
    recompute_method: Optional[str] = None
    """With full recompute: "uniform" (every layer) or "block" (the first recompute_num_layers of each
    stage) (--recompute-method)."""
    recompute_num_layers: Optional[int] = None
    """Layers recomputed per stage with the block method (--recompute-num-layers)."""
    fp16_lm_cross_entropy: bool = False
    """Compute the final cross entropy on fp16 logits (--fp16-lm-cross-entropy); needs fp16 compute."""
    fp32_residual_connection: bool = False
    """Keep the residual stream in fp32 under fp16/bf16 compute (--fp32-residual-connection)."""
    add_bias_linear: bool = True
    """Biases in every linear layer (--disable-bias-linear turns them off)."""
    qkv_has_bias: Optional[bool] = None
    """Bias on the fused QKV projection (--add-qkv-bias); defaults to add_bias_linear."""
    out_proj_has_bias: Optional[bool] = None
    """Bias on the attention output projection (--add-dense-bias); defaults to add_bias_linear."""
    use_sandwich_norm: bool = False
    """Normalise each sub-layer's output before its residual add (--use-sandwich-norm)."""
    attn_post_norm_scale: float = 1.0
    """Initial weight of the post-attention sandwich norm (--attn-post-norm-scale)."""
    ffn_post_norm_scale: float = 1.0
    """Initial weight of the post-MLP sandwich norm (--ffn-post-norm-scale)."""
    params_dtype: str = "float32"
    """Storage dtype of the weights (--params-dtype; Megatron derives it from --fp16/--bf16)."""
    compute_dtype: str = "float32"
    """Dtype of matmuls and activations (--compute-dtype); CPU computes in float32 or float16 only."""
    embedding_init_dtype: str = "float32"
    """Storage dtype of the word and position embeddings (--embedding-dtype)."""
    hidden_act: str = "gelu"
    """"gelu" (exact), "gelu_tanh", "swiglu", "squared_relu" or "silu" (--hidden-act; --swiglu,
    --squared-relu and --openai-gelu select the matching value)."""
    bias_gelu_fusion: bool = True
    """Megatron's fused bias+GeLU, which uses the tanh approximation; applies to "gelu" with a bias
    (--no-bias-gelu-fusion turns it off)."""
    apply_swiglu_fusion: bool = False
    """Fused SwiGLU kernel where the backend has it (--use-fused-swiglu)."""
    apply_rope_fusion: bool = False
    """Fused rotary kernel where the backend has it (--apply-rope-fusion)."""
    use_fused_rmsnorm: bool = False
    """Fused RMSNorm kernel where the backend has it (--use-fused-rmsnorm)."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout activations along the sequence over the tensor-parallel group
    (--sequence-parallel)."""
    num_layer_list: Optional[List] = None
    """Uneven layers per pipeline stage (--num-layer-list): [n_stage0, ...], or with virtual stages one
    such list per model chunk, [[chunk0 stage0, chunk0 stage1, ...], [chunk1 stage0, ...], ...]."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers in each model chunk with the interleaved schedule (--num-layers-per-virtual-pipeline-stage)."""
    jit_layers: bool = False
    """Compile each transformer layer's computation with mindspore.jit and reuse the compiled graph every
    call (the dynamic-graph counterpart of MindFormers' lazy inline). Faster in PyNative mode (fewer,
    larger kernel launches); the first forward compiles each layer (about a second each on CPU). Same
    results: dropout masks are drawn outside the compiled graph, tensor/sequence-parallel collectives run
    inside it, recompute and the pipeline schedules work as without it. A compiled graph keeps reading a
    parameter's buffer: write weights in place (ops.assign), not with Parameter.set_data, once a layer
    has run. Set by --enable-cuda-graph, Megatron's per-layer capture-and-replay flag."""
    moe_config: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts options (--num-experts, --moe-*; document 000/001's moe_config section). With
    `moe_config.num_experts` set, the layers `moe_layer_freq` selects hold an MoE MLP instead of a dense one;
    under jit_layers their attention half is compiled and the MoE half runs eagerly (routing is dynamic)."""

    def __post_init__(self) -> None:
        if self.use_rotary_embedding:
            self.position_embedding_type = "rope"
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(f"--position-embedding-type {self.position_embedding_type!r} is not one of "
                             f"{POSITION_EMBEDDINGS}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS} "
                             "(--swiglu, --squared-relu, --openai-gelu select them from the command line)")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.transformer_impl != "local":
            raise ValueError(f"--transformer-impl {self.transformer_impl!r} is not available; mindtron "
                             "implements 'local'")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_query_groups is None or not self.group_query_attention:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"--num-query-groups {self.num_query_groups} must divide --num-attention-heads "
                             f"{self.num_attention_heads}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                                 f"{self.num_attention_heads}; change one or set --kv-channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = (int(self.hidden_size * 4 * 2 / 3 / 64) * 64 if self.hidden_act == "swiglu"
                                    else 4 * self.hidden_size)
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.position_embedding_type == "learned_absolute" and self.seq_length > self.max_position_embeddings:
            raise ValueError(f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                             f"{self.max_position_embeddings}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope" and int(self.kv_channels * self.rotary_percent) % 2:
            raise ValueError(f"rotary dimension kv_channels x rotary_percent = "
                             f"{self.kv_channels * self.rotary_percent} must be even")
        for name in ("attention_dropout_rate", "hidden_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"--recompute-granularity {self.recompute_granularity!r} is not one of "
                             "'full', 'selective'")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(f"--recompute-method {self.recompute_method!r} is not one of 'uniform', 'block'")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
        if self.recompute_method == "block" and not self.recompute_num_layers:
            raise ValueError("--recompute-method block needs --recompute-num-layers")
        if self.qkv_has_bias is None:
            self.qkv_has_bias = self.add_bias_linear
        if self.out_proj_has_bias is None:
            self.out_proj_has_bias = self.add_bias_linear
        for name in ("params_dtype", "compute_dtype", "embedding_init_dtype"):
            to_dtype(getattr(self, name), name)
        if self.apply_query_key_layer_scaling:
            self.attention_softmax_in_fp32 = True
        if self.fp16_lm_cross_entropy and to_dtype(self.compute_dtype, "compute_dtype") != ms.float16:
            raise ValueError("--fp16-lm-cross-entropy needs fp16 logits: set compute_dtype float16 (--fp16)")
        if isinstance(self.moe_config, dict):
            self.moe_config = MoEConfig(**self.moe_config)
        self.moe_config.validate(self.hidden_size, self.ffn_hidden_size, self.num_layers, self.add_bias_linear)

    # Derived values ------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head."""
        return int(self.kv_channels * self.rotary_percent)

    @property
    def gated_linear_unit(self) -> bool:
        """SwiGLU doubles the first MLP projection ([gate; up])."""
        return self.hidden_act == "swiglu"

    def dtype(self, name: str):
        """The MindSpore dtype of the dtype option `name` ("params_dtype", "compute_dtype", ...)."""
        return to_dtype(getattr(self, name), name)

    def validate_parallel(self, tensor_model_parallel_size: int, expert_model_parallel_size: int = 1,
                          expert_tensor_parallel_size: Optional[int] = None) -> None:
        """Checks that depend on the parallel sizes; raise ValueError naming the flag to change."""
        tp = tensor_model_parallel_size
        self.moe_config.validate_parallel(tp, expert_model_parallel_size,
                                          tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size,
                                          self.sequence_parallel, self.add_bias_linear)
        checks = [
            (self.num_attention_heads, "--num-attention-heads"),
            (self.num_query_groups, "--num-query-groups (key/value heads)"),
            (self.ffn_hidden_size, "--ffn-hidden-size"),
            (self.vocab_size, "the padded vocabulary size (--make-vocab-size-divisible-by)"),
        ]
        for value, what in checks:
            if value % tp:
                raise ValueError(f"{what} = {value} is not divisible by --tensor-model-parallel-size {tp}")
        if self.sequence_parallel and tp > 1 and self.seq_length % tp:
            raise ValueError(f"--sequence-parallel splits --seq-length {self.seq_length} over "
                             f"--tensor-model-parallel-size {tp}, which must divide it")
        if ms.get_context("device_target") == "CPU" and self.dtype("compute_dtype") == ms.bfloat16:
            raise ValueError("compute_dtype bfloat16 (--bf16) has no compute kernels on CPU; use float32 or "
                             "float16 (--fp16) there")
