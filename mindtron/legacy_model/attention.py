"""Self-attention with Megatron's fused QKV layout, grouped-query attention and tensor parallelism.

Shapes: s sequence, b batch, h hidden, np query heads, ng key/value groups, hn head width, all per
tensor-parallel rank where marked `_l` (np_l = np / tp, ng_l = ng / tp).

The fused `query_key_value` weight [(np + 2 ng) hn, h] holds, for each key/value group, that group's
np/ng query heads, then its key head, then its value head. Splitting its rows over tp therefore hands
each rank whole groups, which is why ng must be divisible by tp.

Attention masks are boolean [b or 1, 1, s, s] with True where a query may NOT attend (Megatron's
convention); masked scores are set to -10000 as Megatron's legacy softmax does.

Megatron-Core's options (TransformerConfig): query/key norms before RoPE (qk_layernorm, qk_l2_norm),
per-layer RoPE skipping (no_rope_freq), sliding-window attention (window_size, window_attn_skip_freq:
the window is combined with the mask given), softmax with an extra denominator term (softmax_type
off-by-one / learnable) and a sigmoid output gate per query head (attention_output_gate).
"""
from __future__ import annotations

import enum
import logging
import math
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.legacy_model.fused import use_fused
from mindtron.legacy_model.norms import L2Norm, build_norm
from mindtron.legacy_model.rotary import rotary_settings, rotate
from mindtron.parallel_core import cpu_kernels
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.context_parallel.attention import MASKED_SCORE
from mindtron.parallel_core.tensor_parallel.utils import divide, expand_last

logger = logging.getLogger("mindtron")
_noticed: set = set()  # one-time notices


class AttnMaskType(enum.Enum):
    """What the attention mask argument means (Megatron's enum)."""

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4


_causal_cache: dict = {}


def causal_mask(seq_length: int) -> Tensor:
    """[1, 1, s, s] boolean mask, True above the diagonal (the future)."""
    mask = _causal_cache.get(seq_length)
    if mask is None:
        mask = _causal_cache[seq_length] = Tensor(np.triu(np.ones((seq_length, seq_length), np.bool_), 1)
                                                  [None, None])
    return mask


def sliding_window_mask(seq_length: int, window) -> Tensor:
    """[1, 1, s, s] boolean mask, True where key j lies outside query i's window: j < i - left (left >= 0),
    or j > i + right (right >= 0; under the causal mask only right = 0 matters). -1 is unlimited."""
    left, right = window
    i = np.arange(seq_length)[:, None]
    j = np.arange(seq_length)[None, :]
    outside = np.zeros((seq_length, seq_length), np.bool_)
    if left >= 0:
        outside |= j < i - left
    if right >= 0:
        outside |= j > i + right
    return Tensor(outside[None, None])


class Softmax(nn.Cell):
    """Softmax over the last dimension with its gradient written out on same-shape tensors.

    MindSpore's CPU softmax gradient broadcasts the row sums back over the rows, which is slow there
    (an attention softmax's backward took ~80 ms of which the custom form below needs ~30): dx = p *
    (dp - sum(dp * p)), with the sums tiled to the full shape.
    """

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        n = out.shape[-1]
        rows = (dout * out).reshape(-1, n)
        grad = (dout.reshape(-1, n) - expand_last(rows.sum(-1, keepdims=True), n)).reshape(out.shape) * out
        return (grad,)


class SplitLast(nn.Cell):
    """x [..., sum(widths)] -> pieces [..., w] along the last axis; the gradient is one concat (autodiff of
    a split is a padded slice gradient per piece plus their sum, ~4x the time on CPU)."""

    def __init__(self, widths):
        super().__init__()
        self.widths = tuple(widths)

    def construct(self, x):
        return ops.split(x, self.widths, -1)

    def bprop(self, x, out, dout):
        return (ops.concat(dout, -1),)


class CoreAttention(nn.Cell):
    """softmax(q k^T / sqrt(hn) + mask) v per head, with attention dropout from the model-parallel RNG."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__()
        self.attn_mask_type = attn_mask_type
        self.rng_replay = None  # set under selective recompute
        self.softmax_in_fp32 = config.attention_softmax_in_fp32
        self.dropout_p = config.attention_dropout_rate
        # Megatron's query-key layer scaling divides the scores by the layer number before the softmax
        # and multiplies them back inside it (in fp32); in exact arithmetic it changes nothing.
        self.coeff = float(max(1, layer_number)) if config.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(config.kv_channels) * (self.coeff or 1.0)
        self.batch_matmul = ops.BatchMatMul()
        self.batch_matmul_t = ops.BatchMatMul(transpose_b=True)
        self.softmax = Softmax()
        # Sliding window of this layer, built once for the longest sequence and cut to each input's length
        # (a constant inside a compiled layer).
        window = config.layer_window(layer_number)
        self.window_mask = None if window is None else sliding_window_mask(config.seq_length, window)
        # Softmax with an extra term exp(offset_h) in each row's denominator (a "sink" column).
        self.softmax_type = config.softmax_type
        heads_l = divide(config.num_attention_heads, ps.get_tensor_model_parallel_world_size(),
                         "--num-attention-heads over tp")
        if config.softmax_type == "learnable":
            self.softmax_offset = tp.split_parameter((config.num_attention_heads,), 0, config.init_method(),
                                                     config.dtype("params_dtype"))
        elif config.softmax_type == "off-by-one":
            self.softmax_offset = Tensor(np.zeros(heads_l, np.float32))
        else:
            self.softmax_offset = None
        # fused CPU kernels where they are built (fp32 on CPU), for the plain softmax without query-key layer
        # scaling: scale, mask and softmax in one pass, and without attention dropout the whole attention as
        # one kernel pair on the [s, b, np_l, hn] layout (no transposes)
        self.fused_softmax = self.fused_attention = None
        compute = config.dtype("compute_dtype")
        if (self.coeff is None and self.softmax_offset is None and attn_mask_type != AttnMaskType.no_mask
                and cpu_kernels.enabled(compute)):
            self.fused_softmax = cpu_kernels.MaskedSoftmax(1.0 / self.norm_factor)
            if cpu_kernels.blas_enabled(compute):
                self.fused_attention = cpu_kernels.Attention(1.0 / self.norm_factor)

    def construct(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  dropout_mask: Optional[Tensor] = None) -> Tensor:
        """`dropout_mask` [b, np_l, s, s] (tp.dropout_mask; the transformer layer draws it) replaces drawing
        one here. A mask drawn here under selective recompute is replayed on the recompute pass."""
        if self.rng_replay is not None and dropout_mask is None and self.training and self.dropout_p > 0.0:
            return self.rng_replay(self._forward, query, key, value, attention_mask)
        return self._forward(query, key, value, attention_mask, dropout_mask)

    def _forward(self, query, key, value, attention_mask, dropout_mask=None):
        # query/key/value: [s, b, np_l, hn] (key/value already expanded to np_l heads)
        s, b, n, hn = query.shape
        mask = attention_mask
        if mask is None and self.attn_mask_type == AttnMaskType.causal:
            mask = causal_mask(s)
        if self.window_mask is not None:
            window = self.window_mask[:, :, :s, :s]
            mask = window if mask is None else ops.logical_or(mask, window)
        fused = self.fused_softmax is not None and mask is not None and mask.ndim == 4
        if fused and mask.dtype != ms.bool_:  # the kernels read one byte per element as a flag
            mask = mask.astype(ms.bool_)
        dropping = dropout_mask is not None or (self.training and self.dropout_p > 0.0)
        if fused and self.fused_attention is not None and not dropping:
            context, _ = self.fused_attention(query, key, value, mask)  # the mask broadcast in the kernel
            return context.reshape(s, b, n * hn)
        q = ops.transpose(query, (1, 2, 0, 3))  # [b, np_l, s, hn]
        k = ops.transpose(key, (1, 2, 0, 3))
        v = ops.transpose(value, (1, 2, 0, 3))
        if fused:
            probs = self.fused_softmax(self.batch_matmul_t(q, k), mask)
            return self._attend(probs, v, dropout_mask)
        scores = self.batch_matmul_t(q, k) * (1.0 / self.norm_factor)  # [b, np_l, s, s]
        if self.softmax_in_fp32:
            scores = scores.astype(ms.float32)
        if self.coeff is not None:
            scores = scores * self.coeff
        if mask is not None and self.attn_mask_type != AttnMaskType.no_mask:
            # tiled to the scores' shape: masked_fill with a broadcast mask is ~15x slower on CPU, forward
            # and backward (Tile costs ~1 ms)
            mask = ops.tile(mask, (b // mask.shape[0], n // mask.shape[1], 1, 1))
            scores = ops.masked_fill(scores, mask, Tensor(MASKED_SCORE, scores.dtype))
        if self.softmax_offset is None:
            probs = self.softmax(scores).astype(value.dtype)
        else:
            # Megatron's SoftmaxOne: a sink column holding each head's offset joins the row, then is dropped
            sink = ops.tile(self.softmax_offset.astype(scores.dtype).reshape(1, n, 1, 1), (b, 1, s, 1))
            probs = self.softmax(ops.concat([scores, sink], -1))[..., :-1].astype(value.dtype)
        return self._attend(probs, v, dropout_mask)

    def _attend(self, probs, v, dropout_mask):
        """Attention dropout, then probs [b, np_l, s, s] x v [b, np_l, s, hn] -> context [s, b, np_l hn]."""
        b, n, s, hn = v.shape
        if dropout_mask is not None:
            probs = probs * dropout_mask.astype(probs.dtype)
        elif self.training and self.dropout_p > 0.0:
            with tp.get_rng_tracker().fork():  # heads are split over tp: each rank drops its own
                probs = tp.dropout(probs, self.dropout_p)
        context = self.batch_matmul(probs, v)  # [b, np_l, s, hn]
        return ops.transpose(context, (2, 0, 1, 3)).reshape(s, b, n * hn)


class FlashAttention(nn.Cell):
    """MindSpore's fused flash-attention kernel (Ascend), same maths as CoreAttention."""

    def __init__(self, config, num_heads_local: int, layer_number: int = 1):
        super().__init__()
        self.num_heads = num_heads_local
        self.scale = 1.0 / math.sqrt(config.kv_channels)
        self.keep_prob = 1.0 - config.attention_dropout_rate
        fa = config.fa_config or {}
        self.pre_tokens = int(fa.get("pre_tokens", 2147483647))
        self.next_tokens = int(fa.get("next_tokens", 0))
        window = config.layer_window(layer_number)
        if window is not None:  # sliding window: the kernel's band of keys before / after each query
            if window[0] >= 0:
                self.pre_tokens = min(self.pre_tokens, window[0])
            self.next_tokens = 0

    def construct(self, query, key, value, attention_mask):
        # SBH layout: query [s, b, np_l hn], key/value [s, b, ng_l hn] (not expanded: GQA in the kernel)
        s = query.shape[0]
        mask = causal_mask(s)[0, 0] if attention_mask is None else attention_mask
        return ops.flash_attention_score(
            query, key, value, self.num_heads, attn_mask=mask.astype(ms.uint8),
            keep_prob=self.keep_prob if self.training else 1.0, scalar_value=self.scale,
            pre_tokens=self.pre_tokens, next_tokens=self.next_tokens, input_layout="SBH")


class ParallelAttention(nn.Cell):
    """Megatron's legacy self-attention: query_key_value (column parallel) -> core attention -> dense
    (row parallel). Input and output [s, b, h], or [s/tp, b, h] under sequence parallelism."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__()
        tp_size = ps.get_tensor_model_parallel_world_size()
        hn = config.kv_channels
        self.heads_l = divide(config.num_attention_heads, tp_size, "--num-attention-heads over tp")
        self.groups_l = divide(config.num_query_groups, tp_size, "--num-query-groups over tp")
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.hn = hn
        self.rope_kernel = use_fused("rope", config.apply_rope_fusion)  # decided here: construct stays plain
        self.use_rope = config.layer_uses_rope(layer_number)  # --no-rope-freq skips some layers
        self.rope_interleaved, self.rope_mscale = rotary_settings(config)
        self.gated = config.attention_output_gate
        q_width = self.heads_per_group * hn
        self.split_qkv = SplitLast([q_width, q_width, hn, hn] if self.gated else [q_width, hn, hn])
        compute = config.dtype("compute_dtype")
        params = config.dtype("params_dtype")
        # per key/value group: its query heads, (their gates,) its key head, its value head
        rows_per_group = (self.heads_per_group * (2 if self.gated else 1) + 2) * hn
        self.query_key_value = tp.ColumnParallelLinear(
            config.hidden_size, config.num_query_groups * rows_per_group,
            bias=config.qkv_has_bias, gather_output=False, init_method=config.init_method(),
            sequence_parallel=config.sequence_parallel, params_dtype=params, compute_dtype=compute)
        # Query/key norms see only this rank's heads: their gradients are summed over tensor parallel, as
        # Megatron does for q_layernorm/k_layernorm (marked like sequence-parallel parameters).
        if config.qk_l2_norm:
            self.q_layernorm, self.k_layernorm = L2Norm(config.norm_epsilon), L2Norm(config.norm_epsilon)
        elif config.qk_layernorm:
            self.q_layernorm = build_norm(config, sequence_parallel=True, hidden_size=hn)
            self.k_layernorm = build_norm(config, sequence_parallel=True, hidden_size=hn)
        else:
            self.q_layernorm = self.k_layernorm = None
        # MindSpore's flash-attention kernel has no softmax offset: such layers take the plain path
        if config.use_flash_attention and config.softmax_type != "vanilla" and "softmax" not in _noticed:
            _noticed.add("softmax")
            logger.warning("--use-flash-attn with --softmax-type %s: the flash-attention kernel has no softmax "
                           "offset, attention runs on plain ops", config.softmax_type)
        # Context parallelism: this rank holds s/cp positions; the context-parallel attention brings in the
        # rest of the sequence (CoreAttention still owns the softmax offset, so parameter names stay put).
        self.cp_attention = None
        if ps.get_context_parallel_world_size() > 1:
            from mindtron.parallel_core.context_parallel import ContextParallelAttention
            self.cp_attention = ContextParallelAttention(config, layer_number, config.layer_cp_comm_type(layer_number),
                                                         self.heads_l, self.groups_l)
            if config.use_flash_attention and layer_number == 1:
                logger.warning("--use-flash-attn with --context-parallel-size > 1: the context-parallel attention "
                               "runs on plain ops (online-softmax blocks), not the flash-attention kernel")
        self.use_flash = self.cp_attention is None and use_fused(
            "flash_attention", config.use_flash_attention and config.softmax_type == "vanilla")
        self.core_attention = (FlashAttention(config, self.heads_l, layer_number) if self.use_flash
                               else CoreAttention(config, layer_number, attn_mask_type))
        self.dense = tp.RowParallelLinear(
            config.num_attention_heads * hn, config.hidden_size, bias=config.out_proj_has_bias,
            input_is_parallel=True, init_method=config.output_layer_init_method(),
            sequence_parallel=config.sequence_parallel, params_dtype=params, compute_dtype=compute)

    def _expand_groups(self, x: Tensor) -> Tensor:
        """[s, b, ng_l, hn] -> [s, b, np_l, hn]: each group's head repeated for its query heads."""
        if self.heads_per_group == 1:
            return x
        s, b, g, hn = x.shape
        x = ops.broadcast_to(ops.expand_dims(x, 3), (s, b, g, self.heads_per_group, hn))
        return x.reshape(s, b, g * self.heads_per_group, hn)

    def construct(self, hidden_states: Tensor, attention_mask: Optional[Tensor],
                  rotary_pos_emb: Optional[Tensor] = None, dropout_mask: Optional[Tensor] = None) -> Tensor:
        mixed, _ = self.query_key_value(hidden_states)  # [s, b, ng_l (np/ng (x2 gated) + 2) hn]
        s, b = mixed.shape[0], mixed.shape[1]
        mixed = mixed.reshape(s, b, self.groups_l, sum(self.split_qkv.widths))
        parts = self.split_qkv(mixed)  # query (, gate), key, value of each group
        query, key, value = (parts[0], parts[2], parts[3]) if self.gated else parts
        query = query.reshape(s, b, self.heads_l, self.hn)  # [s, b, np_l, hn]
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        if rotary_pos_emb is not None and self.use_rope:
            query = rotate(query, rotary_pos_emb, self.rope_kernel, self.rope_interleaved, self.rope_mscale)
            key = rotate(key, rotary_pos_emb, self.rope_kernel, self.rope_interleaved, self.rope_mscale)
        if self.cp_attention is not None:  # key/value groups expanded after the exchange (less traffic)
            context = self.cp_attention(query, key, value, attention_mask, self.core_attention.softmax_offset)
        elif self.use_flash:
            context = self.core_attention(query.reshape(s, b, -1), key.reshape(s, b, -1),
                                          value.reshape(s, b, -1), attention_mask)
        else:
            context = self.core_attention(query, self._expand_groups(key), self._expand_groups(value),
                                          attention_mask, dropout_mask)  # [s, b, np_l hn]
        if self.gated:  # sigmoid gate per query head and channel, in fp32 as Megatron
            gate = ops.sigmoid(parts[1].reshape(s, b, -1).astype(ms.float32))
            context = (context.astype(ms.float32) * gate).astype(context.dtype)
        output, _ = self.dense(context)
        return output
