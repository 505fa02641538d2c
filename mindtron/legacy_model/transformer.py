"""Transformer layers and the stack of them that one pipeline stage (or model chunk) holds.

A layer is pre-norm: x + dropout(attn(norm(x))), then x + dropout(mlp(norm(x))); with sandwich norm each
sub-layer's output is normalised again before its residual add. The stack holds the layers of this stage
(numbered globally from 1, as Megatron's layer_number) and, on the last stage, the final norm.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, nn

from mindtron.legacy_model.attention import AttnMaskType, ParallelAttention, causal_mask
from mindtron.legacy_model.mlp import ParallelMLP, activation_function
from mindtron.legacy_model.norms import build_norm
from mindtron.legacy_model.pipeline_layout import pipeline_layer_counts
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe import MoELayer


def stage_layer_range(num_layers: int, pipeline_size: int = 1, pipeline_rank: int = 0,
                      virtual_size: Optional[int] = None, virtual_rank: Optional[int] = None,
                      num_layer_list: Optional[Sequence] = None, **layout) -> Tuple[int, int]:
    """(first global layer index, number of layers) held by one pipeline stage / model chunk.

    Model order with virtual stages is chunk 0 of stages 0..p-1, then chunk 1 of stages 0..p-1, ... An
    uneven `num_layer_list` gives per-stage counts ([n0, n1, ...]) or, with virtual stages, one such list
    per chunk ([[chunk0: n0, n1, ...], [chunk1: ...], ...]); `layout` takes the other placements of
    pipeline_layout.pipeline_layer_counts (first/last stage layers, embedding/loss accounting, a layout).
    """
    counts = pipeline_layer_counts(num_layers, pipeline_size, virtual_size, num_layer_list=num_layer_list, **layout)
    chunk = virtual_rank or 0
    offset = sum(map(sum, counts[:chunk])) + sum(counts[chunk][:pipeline_rank])
    return offset, counts[chunk][pipeline_rank]


def local_layer_range(config) -> Tuple[int, int]:
    """This rank's (first global layer, count) from parallel_state's pipeline and virtual ranks."""
    return stage_layer_range(
        config.num_layers, ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank(),
        ps.get_virtual_pipeline_model_parallel_world_size(), ps.get_virtual_pipeline_model_parallel_rank(),
        config.num_layer_list, first_stage_layers=config.num_layers_in_first_pipeline_stage,
        last_stage_layers=config.num_layers_in_last_pipeline_stage,
        account_for_embedding=config.account_for_embedding_in_pipeline_split,
        account_for_loss=config.account_for_loss_in_pipeline_split, layout=config.pipeline_model_parallel_layout)


class ParallelTransformerLayer(nn.Cell):
    """One pre-norm transformer layer; `layer_number` counts from 1 over the whole model.

    The forward draws the layer's dropout masks (in the order the maths uses them: attention, then the
    two residual branches) and hands them to `_compute`, the layer's maths on tensors only. With
    `config.jit_layers` `_compute` is compiled once with mindspore.jit and replayed on every call; masks
    drawn inside a compiled graph would be frozen, which is why they are inputs. An MoE layer (chosen by
    `moe_config.moe_layer_freq`) routes tokens on the host, so only its attention half is compiled.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__()
        self.layer_number = layer_number
        self.rng_replay = None  # set when the layer is recomputed
        sp = config.sequence_parallel
        self.hidden_dropout = config.hidden_dropout_rate
        self.attention_dropout = config.attention_dropout_rate
        self.attn_mask_type = attn_mask_type
        self.input_norm = build_norm(config, sp)
        self.self_attention = ParallelAttention(config, layer_number, attn_mask_type)
        self.post_attention_norm = build_norm(config, sp)
        moe = config.moe_config
        self.is_moe = moe.is_moe_layer(layer_number - 1, config.num_layers)
        if self.is_moe:
            shared = (ParallelMLP(config, moe.moe_shared_expert_intermediate_size, bias=False)
                      if moe.moe_shared_expert_intermediate_size else None)
            self.mlp = MoELayer(config, moe, layer_number, activation_function(config), config.gated_linear_unit,
                                shared)
        else:
            self.mlp = ParallelMLP(config)
        self.use_sandwich_norm = config.use_sandwich_norm
        if self.use_sandwich_norm:
            self.attn_post_norm = build_norm(config, sp, init_value=config.attn_post_norm_scale)
            self.ffn_post_norm = build_norm(config, sp, init_value=config.ffn_post_norm_scale)
        # under sequence parallelism attention sees the whole sequence: [s/tp, b, h] -> s
        self.sequence_factor = ps.get_tensor_model_parallel_world_size() if sp else 1
        # context parallel: attention exchanges K/V through host-side collectives, so only the MLP compiles
        self.context_parallel = ps.get_context_parallel_world_size() > 1
        if config.jit_layers:
            if self.context_parallel:
                if not self.is_moe:
                    self._mlp_block = ms.jit(self._mlp_block)
            elif self.is_moe:
                self._attention_block = ms.jit(self._attention_block)
            else:
                self._compute = ms.jit(self._compute)

    def construct(self, hidden_states: Tensor, attention_mask: Optional[Tensor],
                  rotary_pos_emb: Optional[Tensor] = None) -> Tensor:
        if self.rng_replay is not None:  # recomputed: the recompute pass must draw the same masks
            return self.rng_replay(self._forward, hidden_states, attention_mask, rotary_pos_emb)
        return self._forward(hidden_states, attention_mask, rotary_pos_emb)

    def _forward(self, hidden_states, attention_mask, rotary_pos_emb):
        # hidden_states: [s, b, h] ([s/tp, b, h] under sequence parallelism)
        attention = self.self_attention
        seq = hidden_states.shape[0] * self.sequence_factor
        # (context parallel: None stays None, the causal structure is built per block of chunks)
        if (attention_mask is None and self.attn_mask_type == AttnMaskType.causal and not attention.use_flash
                and not self.context_parallel):
            attention_mask = causal_mask(seq)
        attention_drop = first_drop = second_drop = None
        if self.training:
            # flash attention and context-parallel attention draw their attention dropout themselves
            if self.attention_dropout > 0.0 and not attention.use_flash and not self.context_parallel:
                with tp.get_rng_tracker().fork():  # heads are split over tp: each rank drops its own
                    attention_drop = tp.dropout_mask((hidden_states.shape[1], attention.heads_l, seq, seq),
                                                     self.attention_dropout)
            if self.hidden_dropout > 0.0:
                first_drop = tp.dropout_mask(hidden_states.shape, self.hidden_dropout)
                second_drop = tp.dropout_mask(hidden_states.shape, self.hidden_dropout)
        return self._compute(hidden_states, attention_mask, rotary_pos_emb, attention_drop, first_drop, second_drop)

    def _compute(self, hidden_states, attention_mask, rotary_pos_emb, attention_drop, first_drop, second_drop):
        hidden_states = self._attention_block(hidden_states, attention_mask, rotary_pos_emb, attention_drop,
                                              first_drop)
        return self._mlp_block(hidden_states, second_drop)

    def _attention_block(self, hidden_states, attention_mask, rotary_pos_emb, attention_drop, first_drop):
        attention_out = self.self_attention(self.input_norm(hidden_states), attention_mask, rotary_pos_emb,
                                            attention_drop)
        if self.use_sandwich_norm:
            attention_out = self.attn_post_norm(attention_out)
        return self._residual_add(hidden_states, attention_out, first_drop)

    def _mlp_block(self, hidden_states, second_drop):
        mlp_out = self.mlp(self.post_attention_norm(hidden_states))
        if self.use_sandwich_norm:
            mlp_out = self.ffn_post_norm(mlp_out)
        return self._residual_add(hidden_states, mlp_out, second_drop)

    def _residual_add(self, residual: Tensor, branch: Tensor, drop: Optional[Tensor]) -> Tensor:
        if drop is not None:
            branch = branch * drop.astype(branch.dtype)
        return residual + branch.astype(residual.dtype)


class ParallelTransformer(nn.Cell):
    """This stage's layers (`layers.0` is global layer `offset`), plus the final norm on the last stage.

    On stages other than the first the input comes from `set_input_tensor` (the previous stage's output).
    """

    def __init__(self, config, layer_offset: int, num_local_layers: int, post_norm: bool = True,
                 pre_process: bool = True, attn_mask_type: AttnMaskType = AttnMaskType.causal):
        super().__init__()
        self.config = config
        self.layer_offset = layer_offset
        self.pre_process = pre_process
        self.sequence_parallel = config.sequence_parallel
        self.layers = nn.CellList([ParallelTransformerLayer(config, layer_offset + i + 1, attn_mask_type)
                                   for i in range(num_local_layers)])
        self.post_norm = post_norm
        if post_norm:
            self.final_norm = build_norm(config, config.sequence_parallel)
        self.input_tensor: Optional[Tensor] = None
        self._apply_recompute(config)

    def _apply_recompute(self, config) -> None:
        if config.recompute_granularity is None:
            return
        for i, layer in enumerate(self.layers):
            if config.recompute_granularity == "selective":
                cell = layer.self_attention.cp_attention or layer.self_attention.core_attention
            elif config.recompute_method == "uniform" or i < config.recompute_num_layers:
                cell = layer
            else:
                continue
            cell.recompute()
            cell.rng_replay = tp.RngReplay()

    def global_layer_index(self, local_index: int) -> int:
        """Global 0-based index of `layers.{local_index}`."""
        return self.layer_offset + local_index

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """The previous pipeline stage's output, used instead of the `hidden_states` argument."""
        self.input_tensor = input_tensor

    def construct(self, hidden_states: Optional[Tensor], attention_mask: Optional[Tensor],
                  rotary_pos_emb: Optional[Tensor] = None) -> Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor
        # Under sequence parallelism each rank's tokens differ, so dropout masks come from the
        # model-parallel stream (as in Megatron); otherwise every tp rank draws the same mask.
        rng = tp.get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()
        with rng, tp.forward_pass():
            for layer in self.layers:
                hidden_states = layer(hidden_states, attention_mask, rotary_pos_emb)
        if self.post_norm:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states
