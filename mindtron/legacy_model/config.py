"""The model configuration (`model_config`): every transformer option of the reference mapping table.

Field names follow the `model_config.*` column of document 002's Megatron mapping; the Megatron flag each
comes from is given in its docstring. `training.arguments` fills it from flags or YAML; scripts and tests
may build it directly. Checks that need only the config run in `__post_init__`; checks that need the
tensor-parallel size run in `validate_parallel()` when a model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import mindspore as ms

from mindtron.parallel_core.moe.config import MoEConfig

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "squared_relu", "silu", "quick_geglu")
GATED_ACTIVATIONS = ("swiglu", "quick_geglu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "yarn", "none")
SOFTMAX_TYPES = ("vanilla", "off-by-one", "learnable")
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


def _layer_pattern(value, num_layers: int, flag: str, skip_every: bool) -> Optional[List[int]]:
    """Megatron's per-layer frequency argument as one 0/1 entry per layer.

    An int N marks every N-th layer (1-based N, 2N, ...): with `skip_every` the marked layers get 1 (the
    --no-rope-freq rule: N - 1 layers with RoPE, then one without), otherwise they get 0 and the others 1
    (--window-attn-skip-freq: every N-th layer is full attention). A list is checked and copied.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{flag} takes an int or a per-layer list, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{flag} {value} must be positive")
        if skip_every and num_layers % value:
            raise ValueError(f"{flag}={value} should divide --num-layers {num_layers}")
        marked = [(layer + 1) % value == 0 for layer in range(num_layers)]
        return [int(m) if skip_every else int(not m) for m in marked]
    pattern = [int(v) for v in value]
    if len(pattern) != num_layers or any(v not in (0, 1) for v in pattern):
        raise ValueError(f"{flag} list must have one 0/1 entry per layer (--num-layers {num_layers}), "
                         f"got {list(value)}")
    return pattern


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
    jit_layers: bool = True
    """Compile each transformer layer's computation with mindspore.jit and reuse the compiled graph every
    call (the dynamic-graph counterpart of MindFormers' lazy inline). On by default (issue 19): faster in
    PyNative mode (fewer, larger kernel launches; 1.25-1.5x per step on CPU); the first forward compiles
    each layer (about a second each on CPU), and a compiled layer holds more memory than an eager one. Same
    results to fp32 rounding (tests/test_jit_layers.py): dropout masks are drawn outside the compiled
    graph, tensor/sequence-parallel collectives run inside it, recompute and the pipeline schedules work as
    without it. A compiled graph keeps reading a parameter's buffer: write weights in place (ops.assign),
    not with Parameter.set_data, once a layer has run. Off with --no-jit-layers (mindtron's flag) or
    `jit_layers=False`; --enable-cuda-graph, Megatron's per-layer capture-and-replay flag, asks for it
    explicitly."""
    moe_config: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts options (--num-experts, --moe-*; document 000/001's moe_config section). With
    `moe_config.num_experts` set, the layers `moe_layer_freq` selects hold an MoE MLP instead of a dense one;
    under jit_layers their attention half is compiled and the MoE half runs eagerly (routing is dynamic)."""

    # Options of Megatron-Core core_r0.19.0's TransformerConfig beyond document 002 (issue 14) -----------
    layernorm_zero_centered_gamma: bool = False
    """Zero-centred norm weights (--apply-layernorm-1p): every LayerNorm/RMSNorm stores gamma - 1 and
    computes norm(x) * (1 + weight) (+ bias); the weights start at 0 (sandwich-norm scales at scale - 1)."""
    qk_layernorm: bool = False
    """Normalise each head's query and key (width kv_channels) with `normalization` before RoPE
    (--qk-layernorm); parameters self_attention.q_layernorm / k_layernorm."""
    qk_l2_norm: bool = False
    """Llama-4 query/key norm (--qk-l2-norm): x / sqrt(mean(x^2) + norm_epsilon) per head, no weights,
    before RoPE; takes the place of --qk-layernorm when both are set, as in Megatron."""
    rotary_interleaved: bool = False
    """Rotate channel pairs (2i, 2i+1) (RoFormer/GPT-J style) instead of (i, i + d/2) (--rotary-interleaved)."""
    rotary_seq_len_interpolation_factor: Optional[float] = None
    """Linear position interpolation: RoPE positions are divided by this factor
    (--rotary-seq-len-interpolation-factor)."""
    use_rope_scaling: bool = False
    """Llama 3.x frequency scaling of RoPE (--use-rope-scaling): wavelengths above 8192 positions are
    divided by rope_scaling_factor, below 2048 kept, smoothly blended between (low/high frequency factors
    1 and 4, original context 8192, as Megatron-Core)."""
    rope_scaling_factor: float = 8.0
    """The Llama 3.x scaling factor (--rope-scaling-factor)."""
    no_rope_freq: Optional[Union[int, List[int]]] = None
    """Layers that skip RoPE (--no-rope-freq): an int N skips every N-th layer (layers N, 2N, ...), or a
    list with one 0/1 per layer (1 = no RoPE). Normalised to the list."""
    yarn_rotary_scaling_factor: float = 1.0
    """YaRN context-extension factor s (--rotary-scaling-factor) for position_embedding_type "yarn"."""
    yarn_original_max_position_embeddings: int = 4096
    """Context length the model was trained at before YaRN (--yarn-original-max-position-embeddings)."""
    yarn_beta_fast: float = 32.0
    """YaRN's rotation count above which a frequency is kept (--yarn-beta-fast)."""
    yarn_beta_slow: float = 1.0
    """YaRN's rotation count below which a frequency is fully interpolated (--yarn-beta-slow)."""
    yarn_mscale: float = 1.0
    """YaRN attention-temperature coefficient (--mscale)."""
    yarn_mscale_all_dim: float = 0.0
    """YaRN attention-temperature divisor coefficient (--mscale-all-dim)."""
    yarn_correction_range_round_to_int: bool = True
    """Round YaRN's correction range to whole channels (--yarn-correction-range-round-to-int /
    --no-yarn-correction-range-round-to-int)."""
    cp_comm_type: Optional[List[str]] = None
    """Context-parallel attention per layer (--cp-comm-type): one of p2p (ring), a2a (Ulysses), allgather,
    a2a+p2p (Ulysses inside, ring across), once for every layer or once per layer; None: the one
    `context_parallel_algo` names. Used when --context-parallel-size > 1."""
    context_parallel_algo: str = "ring"
    """Document 002's context_parallel_algo ("ring", "ulysses", "hybrid"), used when cp_comm_type is None."""
    ulysses_degree_in_cp: Optional[int] = None
    """Ulysses group size inside the context-parallel group for a2a+p2p (document 002)."""
    hierarchical_context_parallel_sizes: Optional[List[int]] = None
    """--hierarchical-context-parallel-sizes: [Ulysses size, ring size] for a2a+p2p."""
    window_size: Optional[Tuple[int, int]] = None
    """Sliding-window attention (--window-size LEFT,RIGHT): a query attends to keys at most LEFT positions
    back (-1: unlimited); the model is causal, so RIGHT adds nothing beyond 0 (Transformer Engine's rule)."""
    window_attn_skip_freq: Optional[Union[int, List[int]]] = None
    """Which layers use the window (--window-attn-skip-freq): an int N makes every N-th layer full
    attention, a list has one entry per layer (1 = sliding window, 0 = full); None: every layer."""
    softmax_type: str = "vanilla"
    """Attention softmax (--softmax-type): "vanilla"; "off-by-one" adds exp(0) to each row's denominator;
    "learnable" adds exp(b_h) with a learned offset per head (self_attention.core_attention.softmax_offset,
    split over tensor parallel, initialised like the other weights)."""
    attention_output_gate: bool = False
    """Gated attention (--attention-output-gate): query_key_value also produces a gate per query head
    (each group's rows: queries, gates, key, value) and the attention output is multiplied by
    sigmoid(gate) before the dense projection."""
    glu_linear_offset: float = 0.0
    """Gated MLPs compute act(gate) * (up + offset) (--glu-linear-offset)."""
    activation_func_clamp_value: Optional[float] = None
    """Gated MLPs clamp gate <= c and -c <= up <= c before the activation (--activation-func-clamp-value),
    GPT-OSS style. With SwiGLU Megatron's fused kernel (the default, --bias-swiglu-fusion) ignores it."""
    bias_swiglu_fusion: bool = True
    """Megatron's fused SwiGLU (--no-bias-swiglu-fusion turns it off); it does not apply
    glu_linear_offset (must be 0) nor activation_func_clamp_value (ignored), the unfused form does."""
    init_method_xavier_uniform: bool = False
    """Glorot-uniform initialisation of every weight matrix (embeddings and output projections included)
    instead of the normal ones (--init-method-xavier-uniform)."""
    embedding_init_method_std: Optional[float] = None
    """Std of the word and position embeddings' normal initialisation (--embedding-init-method-std);
    None: init_method_std."""
    calculate_per_token_loss: bool = False
    """Per-token loss (--calculate-per-token-loss): a micro-batch's loss is the sum over its unmasked tokens
    and the iteration's gradients are divided by the number of unmasked tokens of the whole global batch
    (all micro-batches and data-parallel ranks), as Megatron-Core does; GPTModel then returns the sum."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Layers on the first pipeline stage (--decoder-first-pipeline-num-layers); the remaining layers
    are split evenly over the other stages."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Layers on the last pipeline stage (--decoder-last-pipeline-num-layers)."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as one layer when splitting layers over pipeline stages: the first stage holds
    one transformer layer fewer (--account-for-embedding-in-pipeline-split)."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the loss head as one layer: the last stage holds one layer fewer
    (--account-for-loss-in-pipeline-split)."""
    pipeline_model_parallel_layout: Optional[Union[str, list]] = None
    """Explicit placement (--pipeline-model-parallel-layout), Megatron's syntax: stages separated by "|",
    "E" embedding, "t" a transformer layer, "L" the loss, "(...)*n" and "x*n" repeat, commas are
    cosmetic; stage i of the list is virtual stage i // pp of pipeline rank i % pp. Or the parsed list
    of lists of "embedding"/"decoder"/"loss"."""

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
        self._check_extended_options()
        if isinstance(self.moe_config, dict):
            self.moe_config = MoEConfig(**self.moe_config)
        self.moe_config.validate(self.hidden_size, self.ffn_hidden_size, self.num_layers, self.add_bias_linear)

    def _check_extended_options(self) -> None:
        """Checks of the core_r0.19.0 options (issue 14), with Megatron's rules and messages naming flags."""
        if self.softmax_type not in SOFTMAX_TYPES:
            raise ValueError(f"--softmax-type {self.softmax_type!r} is not one of {SOFTMAX_TYPES}")
        if self.softmax_type == "learnable" and self.init_method_xavier_uniform:
            raise ValueError("--softmax-type learnable with --init-method-xavier-uniform: Megatron initialises the "
                             "per-head softmax offsets with the weight init method, and Glorot-uniform has no fan-in "
                             "for a vector; drop one of the two")
        self.no_rope_freq = _layer_pattern(self.no_rope_freq, self.num_layers, "--no-rope-freq", skip_every=True)
        self.window_attn_skip_freq = _layer_pattern(self.window_attn_skip_freq, self.num_layers,
                                                    "--window-attn-skip-freq", skip_every=False)
        if self.window_size is not None:
            window = tuple(int(w) for w in self.window_size)
            if len(window) != 2 or window[0] < -1 or window[1] < -1:
                raise ValueError(f"--window-size takes LEFT,RIGHT with values >= -1 (-1: unlimited), got "
                                 f"{self.window_size}")
            self.window_size = window
        elif self.window_attn_skip_freq is not None:
            raise ValueError("--window-attn-skip-freq needs --window-size")
        if self.rotary_seq_len_interpolation_factor is not None and self.rotary_seq_len_interpolation_factor <= 0:
            raise ValueError(f"--rotary-seq-len-interpolation-factor must be positive, got "
                             f"{self.rotary_seq_len_interpolation_factor}")
        if self.use_rope_scaling and self.rope_scaling_factor <= 0:
            raise ValueError(f"--rope-scaling-factor must be positive, got {self.rope_scaling_factor}")
        if self.position_embedding_type == "yarn":
            if self.rotary_interleaved:
                raise ValueError("YaRN (--position-embedding-type yarn) does not support --rotary-interleaved")
            if self.yarn_rotary_scaling_factor <= 0:
                raise ValueError(f"--rotary-scaling-factor must be positive, got {self.yarn_rotary_scaling_factor}")
            if self.kv_channels % 2:
                raise ValueError(f"YaRN rotates all kv_channels ({self.kv_channels}) channels: they must be even")
        if self.activation_func_clamp_value is not None and self.activation_func_clamp_value <= 0:
            raise ValueError(f"--activation-func-clamp-value must be positive, got {self.activation_func_clamp_value}")
        if self.glu_linear_offset and self.hidden_act not in GATED_ACTIVATIONS:
            raise ValueError(f"--glu-linear-offset applies to gated MLPs (--swiglu, --quick-geglu), not "
                             f"hidden_act {self.hidden_act!r}")
        if self.glu_linear_offset and self.hidden_act == "swiglu" and self.bias_swiglu_fusion:
            raise ValueError("--glu-linear-offset with --swiglu needs --no-bias-swiglu-fusion: Megatron's fused "
                             "SwiGLU has no offset (it refuses the combination)")
        if self.embedding_init_method_std is not None and self.embedding_init_method_std < 0:
            raise ValueError(f"--embedding-init-method-std must be >= 0, got {self.embedding_init_method_std}")
        for name, flag in (("num_layers_in_first_pipeline_stage", "--decoder-first-pipeline-num-layers"),
                           ("num_layers_in_last_pipeline_stage", "--decoder-last-pipeline-num-layers")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{flag} must be larger than 0, got {value}")
        uneven = self.num_layers_in_first_pipeline_stage is not None or \
            self.num_layers_in_last_pipeline_stage is not None
        accounted = self.account_for_embedding_in_pipeline_split or self.account_for_loss_in_pipeline_split
        if uneven and accounted:
            raise ValueError("--decoder-first/last-pipeline-num-layers cannot be combined with "
                             "--account-for-embedding-in-pipeline-split / --account-for-loss-in-pipeline-split")
        if self.pipeline_model_parallel_layout is not None and (uneven or accounted or self.num_layer_list):
            raise ValueError("--pipeline-model-parallel-layout cannot be combined with other pipeline layout "
                             "arguments (--decoder-first/last-pipeline-num-layers, --account-for-*-in-pipeline-"
                             "split, --num-layer-list)")
        if self.num_layer_list and (uneven or accounted):
            raise ValueError("--num-layer-list cannot be combined with --decoder-first/last-pipeline-num-layers or "
                             "--account-for-*-in-pipeline-split")
        if self.pipeline_model_parallel_layout is not None:
            from mindtron.legacy_model.pipeline_layout import parse_layout

            parse_layout(self.pipeline_model_parallel_layout)  # syntax now; stage counts when a model is built

    # Derived values ------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head (YaRN rotates all of them, as Megatron's YaRN ignores --rotary-percent)."""
        if self.position_embedding_type == "yarn":
            return self.kv_channels
        return int(self.kv_channels * self.rotary_percent)

    @property
    def gated_linear_unit(self) -> bool:
        """Gated activations (SwiGLU, quick-GeGLU) double the first MLP projection ([gate; up])."""
        return self.hidden_act in GATED_ACTIVATIONS

    @property
    def uses_rotary(self) -> bool:
        """RoPE in either form ("rope" or "yarn")."""
        return self.position_embedding_type in ("rope", "yarn")

    def layer_uses_rope(self, layer_number: int) -> bool:
        """Whether layer `layer_number` (1-based) applies RoPE (--no-rope-freq)."""
        return self.uses_rotary and not (self.no_rope_freq and self.no_rope_freq[layer_number - 1])

    def layer_cp_comm_type(self, layer_number: int) -> str:
        """The context-parallel algorithm of layer `layer_number` (1-based): p2p, a2a, allgather or a2a+p2p."""
        from mindtron.parallel_core.context_parallel.settings import layer_comm_types
        return layer_comm_types(self.num_layers, self.cp_comm_type, self.context_parallel_algo)[layer_number - 1]

    def layer_window(self, layer_number: int) -> Optional[Tuple[int, int]]:
        """The sliding window of layer `layer_number` (1-based), None for full attention (Megatron's
        is_layer_window_attention)."""
        if not self.window_size:
            return None
        freq = self.window_attn_skip_freq
        if freq is None or freq[layer_number - 1]:
            return self.window_size
        return None

    def init_method(self):
        """Initialisation of weight matrices that read the residual stream (QKV, MLP in, untied output layer):
        N(0, init_method_std^2), or Glorot-uniform with --init-method-xavier-uniform."""
        from mindtron.parallel_core import tensor_parallel as tp

        if self.init_method_xavier_uniform:
            return tp.xavier_uniform_init_method()
        return tp.init_method_normal(self.init_method_std)

    def output_layer_init_method(self):
        """Initialisation of the projections that write the residual stream (attention dense, MLP out):
        N(0, (init_method_std / sqrt(2 num_layers))^2), or Glorot-uniform with --init-method-xavier-uniform."""
        from mindtron.parallel_core import tensor_parallel as tp

        if self.init_method_xavier_uniform:
            return tp.xavier_uniform_init_method()
        return tp.scaled_init_method_normal(self.init_method_std, self.num_layers)

    def embedding_init_method(self):
        """Initialisation of the word, position and token-type embeddings (Megatron-Core's rule): N(0, s^2) with
        s = --embedding-init-method-std (default init_method_std), unless Glorot-uniform was asked for and s
        is init_method_std, in which case the embeddings are Glorot-uniform too."""
        from mindtron.parallel_core import tensor_parallel as tp

        std = self.init_method_std if self.embedding_init_method_std is None else self.embedding_init_method_std
        if self.init_method_xavier_uniform and std == self.init_method_std:
            return tp.xavier_uniform_init_method()
        return tp.init_method_normal(std)

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
