"""Megatron's legacy language model: embedding -> transformer encoder (-> output layer when untied).

    tokens [b, s] --embedding--> [s, b, h] (or [s/tp, b, h] with sequence parallel)
                  --encoder----> [s, b, h] after the final norm on the last stage
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.legacy_model.attention import AttnMaskType
from mindtron.legacy_model.rotary import RotaryEmbedding
from mindtron.legacy_model.transformer import ParallelTransformer, local_layer_range
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.context_parallel.batch import this_rank_positions


class _Table(nn.Cell):
    """A replicated lookup table with a `weight` parameter (position and token-type embeddings)."""

    def __init__(self, rows: int, width: int, init_method, dtype):
        super().__init__()
        self.weight = tp.replicated_parameter((rows, width), init_method, dtype)

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)


class Embedding(nn.Cell):
    """Word (vocabulary-parallel) + learned position (+ token type) embeddings, then embedding dropout."""

    def __init__(self, config, num_tokentypes: int = 0):
        super().__init__()
        init = config.embedding_init_method()  # --embedding-init-method-std / --init-method-xavier-uniform
        dtype = config.dtype("embedding_init_dtype")
        self.word_embeddings = tp.VocabParallelEmbedding(config.vocab_size, config.hidden_size, init_method=init,
                                                         params_dtype=dtype)
        self.learned_positions = config.position_embedding_type == "learned_absolute"
        if self.learned_positions:
            self.position_embeddings = _Table(config.max_position_embeddings, config.hidden_size, init, dtype)
        self.num_tokentypes = num_tokentypes
        if num_tokentypes > 0:
            self.tokentype_embeddings = _Table(num_tokentypes, config.hidden_size, init, dtype)
        self.output_dtype = ms.float32 if config.fp32_residual_connection else config.dtype("compute_dtype")
        self.sequence_parallel = config.sequence_parallel
        self.dropout_p = config.hidden_dropout_rate

    def construct(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                  tokentype_ids: Optional[Tensor] = None) -> Tensor:
        embeddings = self.word_embeddings(input_ids)  # [b, s, h]
        if self.learned_positions:
            if position_ids is None:
                position_ids = ops.broadcast_to(ops.arange(input_ids.shape[1], dtype=ms.int32), input_ids.shape)
            embeddings = embeddings + self.position_embeddings(position_ids).astype(embeddings.dtype)
        if tokentype_ids is not None:
            if self.num_tokentypes == 0:
                raise ValueError("tokentype_ids were given but the model was built with num_tokentypes=0")
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids).astype(embeddings.dtype)
        embeddings = ops.transpose(embeddings, (1, 0, 2)).astype(self.output_dtype)  # [s, b, h]
        if self.sequence_parallel:
            embeddings = tp.scatter_to_sequence_parallel_region(embeddings)  # [s/tp, b, h]
            with tp.get_rng_tracker().fork():
                return tp.dropout(embeddings, self.dropout_p, self.training)
        return tp.dropout(embeddings, self.dropout_p, self.training)


class TransformerLanguageModel(nn.Cell):
    """The stages' share of the model: embedding on the first stage, this stage's layers, the final norm
    and (untied) output layer on the last stage. Returns hidden states [s, b, h]."""

    def __init__(self, config, encoder_attn_mask_type: AttnMaskType = AttnMaskType.causal, num_tokentypes: int = 0,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embedding = Embedding(config, num_tokentypes)
        self.use_rotary = config.uses_rotary
        cp = ps.get_context_parallel_world_size()
        self.cp_positions = Tensor(this_rank_positions(config.seq_length)) if cp > 1 else None
        if self.use_rotary:
            self.rotary_pos_emb = RotaryEmbedding(config)
        offset, count = local_layer_range(config)
        self.encoder = ParallelTransformer(config, offset, count, post_norm=post_process, pre_process=pre_process,
                                           attn_mask_type=encoder_attn_mask_type)
        if post_process and config.untie_embeddings_and_output_weights:
            self.output_layer = tp.ColumnParallelLinear(
                config.hidden_size, config.vocab_size, bias=False, init_method=config.init_method(),
                params_dtype=config.dtype("params_dtype"))

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """Feed a non-first pipeline stage the previous stage's output."""
        self.encoder.set_input_tensor(input_tensor)

    def construct(self, enc_input_ids: Optional[Tensor], enc_position_ids: Optional[Tensor],
                  enc_attn_mask: Optional[Tensor], tokentype_ids: Optional[Tensor] = None) -> Tensor:
        # context parallel: learned position embeddings need the true positions of this rank's tokens
        if (enc_position_ids is None and self.cp_positions is not None and self.pre_process
                and self.embedding.learned_positions):
            enc_position_ids = ops.broadcast_to(self.cp_positions, enc_input_ids.shape)
        hidden = self.embedding(enc_input_ids, enc_position_ids, tokentype_ids) if self.pre_process else None
        rotary = self.rotary_pos_emb(self.config.seq_length) if self.use_rotary else None
        if rotary is not None and self.cp_positions is not None:  # the rows of this rank's positions
            rotary = ops.gather(rotary, self.cp_positions, 0)
        return self.encoder(hidden, enc_attn_mask, rotary)


def get_language_model(config, num_tokentypes: int = 0, add_pooler: bool = False,
                       encoder_attn_mask_type: AttnMaskType = AttnMaskType.causal, pre_process: bool = True,
                       post_process: bool = True):
    """Megatron's factory: (language model, its checkpoint key)."""
    if add_pooler:
        raise ValueError("add_pooler: the pooler belongs to BERT-style models, which mindtron does not build")
    model = TransformerLanguageModel(config, encoder_attn_mask_type, num_tokentypes, pre_process, post_process)
    return model, "language_model"
