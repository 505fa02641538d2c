"""GPTModel: the language model plus the logits head and the masked vocab-parallel cross entropy.

    loss = GPTModel(config)(tokens [b, s], position_ids, attention_mask, loss_mask, labels=labels)
    (the masked mean over tokens; the masked sum with config.calculate_per_token_loss)
    logits [b, s, v/tp] = GPTModel(config)(tokens, position_ids, attention_mask)

Parameters are named as in Megatron's legacy checkpoints (language_model.embedding.word_embeddings.weight,
language_model.encoder.layers.{i}.self_attention.query_key_value.weight, ...), with `layers.{i}` numbered
locally on each pipeline stage as Megatron numbers them. Each parameter starts from the tensor drawn for its
layout-independent name (global layer index; the last stage's copy of a tied embedding uses the first
stage's name), so every parallel layout starts from the same model.
"""
from __future__ import annotations

import re
from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.legacy_model.attention import AttnMaskType
from mindtron.legacy_model.eod_mask import EodMask
from mindtron.legacy_model.language_model import get_language_model
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.context_parallel.loss import context_parallel_token_mean
from mindtron.parallel_core.context_parallel.settings import validate_context_parallel

WORD_EMBEDDING = "language_model.embedding.word_embeddings.weight"
_LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.")


class ParallelLMLogits(nn.Cell):
    """hidden [s, b, h] x word-embedding-shaped weight [v/tp, h] -> logits [s, b, v/tp] (or gathered [s, b, v])."""

    def __init__(self, config, bias: bool = False, compute_dtype=None):
        super().__init__()
        if bias:
            raise ValueError("ParallelLMLogits: a bias on the output layer is not part of Megatron's GPT")
        self.linear = tp.ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                              sequence_parallel=config.sequence_parallel,
                                              skip_weight_param_allocation=True, compute_dtype=compute_dtype)

    def construct(self, hidden: Tensor, weight: Tensor, parallel_output: bool = True) -> Tensor:
        logits, _ = self.linear(hidden, weight)
        if parallel_output:
            return logits
        return tp.gather_from_tensor_model_parallel_region(logits)


def masked_mean(losses: Tensor, loss_mask: Optional[Tensor]) -> Tensor:
    """sum(losses x mask) / sum(mask) over a micro-batch (Megatron's GPT loss_func)."""
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.astype(ms.float32)
    return (losses.astype(ms.float32) * mask).sum() / mask.sum()


def masked_sum(losses: Tensor, loss_mask: Optional[Tensor]) -> Tensor:
    """sum(losses x mask) over a micro-batch: the per-token loss (--calculate-per-token-loss), which the
    training step divides by the unmasked tokens of the whole global batch."""
    if loss_mask is None:
        return losses.astype(ms.float32).sum()
    return (losses.astype(ms.float32) * loss_mask.astype(ms.float32)).sum()


def post_language_model_processing(parallel_lm_logits: ParallelLMLogits, lm_output: Tensor,
                                   labels: Optional[Tensor], logit_weights: Tensor, parallel_output: bool,
                                   fp16_lm_cross_entropy: bool, loss_mask: Optional[Tensor],
                                   per_token_loss: bool = False) -> Tensor:
    """Logits [b, s, v(/tp)] without labels; with labels [b, s] the masked mean cross entropy (the masked
    sum with `per_token_loss`)."""
    logits = parallel_lm_logits(lm_output, logit_weights, True)  # [s, b, v/tp]
    if labels is None:
        if not parallel_output:
            logits = tp.gather_from_tensor_model_parallel_region(logits)
        return ops.transpose(logits, (1, 0, 2))  # [b, s, v]
    if fp16_lm_cross_entropy:
        if logits.dtype != ms.float16:
            raise ValueError(f"fp16_lm_cross_entropy needs float16 logits, got {logits.dtype}")
    else:
        logits = logits.astype(ms.float32)
    losses = tp.vocab_parallel_cross_entropy(logits, ops.transpose(labels, (1, 0)))  # [s, b]
    if per_token_loss:
        return masked_sum(ops.transpose(losses, (1, 0)), loss_mask)
    if ps.get_context_parallel_world_size() > 1:  # this rank holds part of each sequence
        return context_parallel_token_mean(ops.transpose(losses, (1, 0)), loss_mask)
    return masked_mean(ops.transpose(losses, (1, 0)), loss_mask)


class GPTModel(nn.Cell):
    """Megatron's legacy GPT on this rank: the pipeline stage `pre_process`/`post_process` describe.

    kwargs: `eod` (token id) builds per-document position ids and attention masks from the tokens when
    they are not given, with positions restarting per document if `reset_position_ids`.
    """

    def __init__(self, config, num_tokentypes: int = 0, parallel_output: bool = True, pre_process: bool = True,
                 post_process: bool = True, **kwargs):
        super().__init__()
        config.validate_parallel(ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
                                 ps.get_expert_tensor_parallel_world_size())
        validate_context_parallel(ps.get_context_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                                  config.seq_length, config.num_attention_heads, config.num_query_groups,
                                  config.num_layers, config.cp_comm_type, config.context_parallel_algo,
                                  config.hierarchical_context_parallel_sizes, config.ulysses_degree_in_cp,
                                  config.sequence_parallel)
        self.config = config
        self.parallel_output = parallel_output
        self.pre_process, self.post_process = pre_process, post_process
        self.untie_embeddings_and_output_weights = config.untie_embeddings_and_output_weights
        self.fp16_lm_cross_entropy = config.fp16_lm_cross_entropy
        self.seq_length = config.seq_length
        self.eod = kwargs.get("eod")
        self.reset_position_ids = bool(kwargs.get("reset_position_ids", False))
        if self.eod is not None:
            self.eod_mask = EodMask(self.eod, self.reset_position_ids)
        self.model_key = "gpt_model"
        self.language_model, _ = get_language_model(config, num_tokentypes=num_tokentypes, add_pooler=False,
                                                    encoder_attn_mask_type=AttnMaskType.causal,
                                                    pre_process=pre_process, post_process=post_process)
        if post_process:
            self.parallel_lm_logits = ParallelLMLogits(config, bias=False,
                                                       compute_dtype=config.dtype("compute_dtype"))
        self.initialize_word_embeddings()
        self._mark_embedding_and_output()
        tp.initialize_parameters(self, rename=self.layout_independent_name)

    def _mark_embedding_and_output(self) -> None:
        """Flag the word embedding and output-layer weights `is_embedding_or_output_parameter`, as Megatron-Core
        does: --decoupled-lr gives them their own learning rate."""
        for weight in (self.shared_embedding_or_output_weight(),
                       self.language_model.embedding.word_embeddings.weight if self.pre_process else None):
            if weight is not None:
                weight.is_embedding_or_output_parameter = True

    # Embedding shared between the first and last stage ------------------------------------------------
    def initialize_word_embeddings(self) -> None:
        """With tied weights and the head on a stage without the embedding, hold a copy of the word
        embedding there (`word_embeddings_for_head`); it starts equal to the first stage's, and its
        gradient is summed with the first stage's over the embedding group."""
        if self.untie_embeddings_and_output_weights or ps.get_pipeline_model_parallel_world_size() == 1:
            return
        if self.pre_process:
            self.language_model.embedding.word_embeddings.weight.shared_embedding = True
        if self.post_process and not self.pre_process:
            c = self.config
            self.word_embeddings_for_head = tp.VocabParallelEmbedding(
                c.vocab_size, c.hidden_size, init_method=c.embedding_init_method(),
                params_dtype=c.dtype("embedding_init_dtype"))
            self.word_embeddings_for_head.weight.shared_embedding = True

    def shared_embedding_or_output_weight(self):
        """The weight the logits head multiplies by (the word embedding unless untied)."""
        if self.untie_embeddings_and_output_weights:
            return self.language_model.output_layer.weight if self.post_process else None
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        return self.word_embeddings_for_head.weight if self.post_process else None

    def layout_independent_name(self, name: str) -> str:
        """The name a parameter would have in a single-stage model (global layer index)."""
        if name == "word_embeddings_for_head.weight":
            return WORD_EMBEDDING
        match = _LAYER.match(name)
        if match:
            index = self.language_model.encoder.global_layer_index(int(match.group(1)))
            return f"language_model.encoder.layers.{index}." + name[match.end():]
        return name

    # Forward ---------------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """Feed a non-first pipeline stage the previous stage's output [s, b, h]."""
        self.language_model.set_input_tensor(input_tensor)

    def construct(self, tokens: Optional[Tensor], position_ids: Optional[Tensor] = None,
                  attention_mask: Optional[Tensor] = None, loss_mask: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, tokentype_ids: Optional[Tensor] = None) -> Tensor:
        """Loss (with labels) or logits [b, s, v/tp] on the last stage; hidden states [s, b, h] elsewhere.

        attention_mask: bool [b or 1, 1, s, s], True where attention is not allowed; None is causal.
        """
        if self.eod is not None and tokens is not None and (position_ids is None or attention_mask is None):
            if ps.get_context_parallel_world_size() > 1:
                raise ValueError("GPTModel(eod=...) builds masks from whole sequences; under --context-parallel-size"
                                 " > 1 pass position_ids and attention_mask split by get_batch_on_this_cp_rank")
            eod_positions, eod_mask = self.eod_mask(tokens)
            position_ids = eod_positions if position_ids is None else position_ids
            attention_mask = eod_mask if attention_mask is None else attention_mask
        lm_output = self.language_model(tokens, position_ids, attention_mask, tokentype_ids=tokentype_ids)
        if not self.post_process:
            return lm_output
        return post_language_model_processing(self.parallel_lm_logits, lm_output, labels,
                                              self.shared_embedding_or_output_weight(), self.parallel_output,
                                              self.fp16_lm_cross_entropy, loss_mask,
                                              self.config.calculate_per_token_loss)
