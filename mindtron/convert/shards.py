"""Tensor-parallel merge and split of canonical tensors, vocabulary re-padding, and pipeline stage layouts.

How each tensor is split over tensor-parallel ranks (Megatron's and mindtron's layers agree):

    word embedding, output layer     rows (vocabulary ranges)                 VocabParallelEmbedding / column
    query_key_value weight and bias  rows (whole key/value groups per rank)    column parallel
    dense_h_to_4h weight and bias    rows; with SwiGLU each rank holds its own [gate_r; up_r]
    dense, dense_4h_to_h weight      columns                                   row parallel
    everything else                  replicated (norms, row-parallel biases, position embeddings, routers)

Routed experts (stacked [E, ...]) are split by expert over the expert-parallel ranks (contiguous blocks: rank r
holds experts r x E/EP ...) and each expert like a dense MLP over the expert tensor-parallel ranks: the first
projection by rows (dimension 1 of the stack, [gate_r; up_r] per rank with SwiGLU), the second by columns
(dimension 2). Shared experts are split over the tensor-parallel ranks like the dense MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mindtron.convert import names as N
from mindtron.legacy_model.transformer import stage_layer_range


@dataclass(frozen=True)
class SplitRule:
    """How a tensor is laid out over tensor-parallel ranks."""

    dim: Optional[int]  # None: every rank holds the whole tensor
    glu: bool = False   # the split dimension holds two halves ([gate; up]) split separately


def split_rule(name: str, gated: bool) -> SplitRule:
    """The split rule of canonical tensor `name` over the tensor-parallel group that holds it (the expert
    tensor-parallel group for routed experts); `gated`: the model uses SwiGLU."""
    if N.is_expert(name):
        if name.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias")):
            return SplitRule(1, glu=gated)
        return SplitRule(2) if name.endswith("dense_4h_to_h.weight") else SplitRule(None)
    if name in (N.WORD, N.OUTPUT, N.HEAD_COPY) or name.endswith("query_key_value.weight") \
            or name.endswith("query_key_value.bias"):
        return SplitRule(0)
    if name.endswith("dense_h_to_4h.weight") or name.endswith("dense_h_to_4h.bias"):
        return SplitRule(0, glu=gated)
    if name.endswith("self_attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
        return SplitRule(1)
    return SplitRule(None)


class ReplicaMismatch(Exception):
    """Raised inside merge_tp when the copies of a replicated tensor differ (the caller reports it)."""


def merge_tp(shards: Sequence[np.ndarray], rule: SplitRule, check_replicas: bool = True) -> np.ndarray:
    """The whole tensor from its tensor-parallel shards (in rank order)."""
    if rule.dim is None:
        if check_replicas:
            for other in shards[1:]:
                if other.shape != shards[0].shape or not np.array_equal(other, shards[0]):
                    raise ReplicaMismatch(float(np.abs(other.astype(np.float64) - shards[0]).max())
                                          if other.shape == shards[0].shape else float("inf"))
        return shards[0]
    if rule.glu:
        halves = [np.split(s, 2, axis=rule.dim) for s in shards]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=rule.dim)
    return np.concatenate(list(shards), axis=rule.dim)


def split_tp(tensor: np.ndarray, rule: SplitRule, tp: int, name: str = "") -> List[np.ndarray]:
    """The tensor-parallel shards of a whole tensor (rank order); each shard is a contiguous copy."""
    if rule.dim is None or tp == 1:
        return [tensor] * tp
    size = tensor.shape[rule.dim]
    if size % (2 * tp if rule.glu else tp):
        raise ValueError(f"{name}: dimension {rule.dim} of size {size} cannot be split over tensor-parallel size {tp}")
    if rule.glu:
        gate, up = np.split(tensor, 2, axis=rule.dim)
        return [np.ascontiguousarray(np.concatenate([g, u], axis=rule.dim))
                for g, u in zip(np.split(gate, tp, axis=rule.dim), np.split(up, tp, axis=rule.dim))]
    return [np.ascontiguousarray(s) for s in np.split(tensor, tp, axis=rule.dim)]


def repad_vocab(table: np.ndarray, rows: int, true_vocab: Optional[int], name: str) -> np.ndarray:
    """The vocabulary table with `rows` rows: padding rows dropped, or zero rows added."""
    have = table.shape[0]
    if rows == have:
        return table
    if rows < have:
        keep = true_vocab if true_vocab is not None else rows
        if keep > rows:
            raise ValueError(f"{name}: cannot shrink {have} rows to {rows}, below the true vocabulary {keep}")
        return np.ascontiguousarray(table[:rows])
    pad = np.zeros((rows - have,) + table.shape[1:], table.dtype)
    return np.concatenate([table, pad], axis=0)


# --------------------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------------------
def stage_offsets(layer_counts: Sequence[int]) -> List[int]:
    """Global index of each stage's first layer, from the layers each stage holds (in model order)."""
    offsets, total = [], 0
    for count in layer_counts:
        offsets.append(total)
        total += count
    return offsets


def local_layer_count(stage_names: Sequence[str], where: str) -> int:
    """Layers held by one stage, from its (stage-local) tensor names; they must be 0..n-1."""
    indices = sorted({parsed[0] for parsed in map(N.layer_of, stage_names) if parsed is not None})
    if indices != list(range(len(indices))):
        raise ValueError(f"{where}: layer indices {indices} are not 0..n-1 (a stage's layers are numbered from 0); "
                         "the checkpoint is incomplete or not in Megatron's per-stage numbering")
    return len(indices)


@dataclass(frozen=True)
class StagePlan:
    """What one target pipeline stage holds."""

    rank: int
    first_layer: int
    num_layers: int
    pre_process: bool
    post_process: bool


def plan_stages(num_layers: int, pp: int, num_layer_list: Optional[Sequence[int]] = None) -> List[StagePlan]:
    """The layer range of each of `pp` stages (even, or as `num_layer_list` gives; mindtron's rule)."""
    plans = []
    for rank in range(pp):
        first, count = stage_layer_range(num_layers, pp, rank, None, None, num_layer_list)
        plans.append(StagePlan(rank, first, count, rank == 0, rank == pp - 1))
    return plans


def stage_tensors(full: Dict[str, np.ndarray], plan: StagePlan, untied: bool, pp: int) -> Dict[str, np.ndarray]:
    """The whole tensors a stage holds, by stage-local canonical name (layers renumbered from 0)."""
    out: Dict[str, np.ndarray] = {}
    for name, tensor in full.items():
        parsed = N.layer_of(name)
        if parsed is not None:
            index, rest = parsed
            if plan.first_layer <= index < plan.first_layer + plan.num_layers:
                out[N.layer_name(index - plan.first_layer, rest)] = tensor
        elif name in (N.WORD, N.POSITION):
            if plan.pre_process:
                out[name] = tensor
        elif name.startswith(N.FINAL_NORM) or name == N.OUTPUT:
            if plan.post_process:
                out[name] = tensor
        else:
            raise ValueError(f"{name} is not a tensor of the whole model")
    if plan.post_process and not plan.pre_process and not untied and pp > 1:
        out[N.HEAD_COPY] = full[N.WORD]  # the last stage's copy of the tied embedding
    return out


def split_stage(stage: Dict[str, np.ndarray], tp: int, gated: bool) -> List[Dict[str, np.ndarray]]:
    """A stage's whole tensors except routed experts as `tp` per-rank dicts."""
    ranks: List[Dict[str, np.ndarray]] = [{} for _ in range(tp)]
    for name, tensor in stage.items():
        if N.is_expert(name):
            continue
        for rank, shard in enumerate(split_tp(tensor, split_rule(name, gated), tp, name)):
            ranks[rank][name] = shard
    return ranks


def split_stage_experts(stage: Dict[str, np.ndarray], ep: int, etp: int,
                        gated: bool) -> Dict[Tuple[int, int], Dict[str, np.ndarray]]:
    """A stage's routed experts as (expert-parallel rank, expert tensor-parallel rank) -> that rank's stacks
    [E / ep, ...] (empty dicts for a stage without MoE layers)."""
    ranks: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {(e, t): {} for e in range(ep) for t in range(etp)}
    for name, tensor in stage.items():
        if not N.is_expert(name):
            continue
        if tensor.shape[0] % ep:
            raise ValueError(f"{name}: {tensor.shape[0]} experts cannot be spread over expert-parallel size {ep}")
        for ep_rank, block in enumerate(np.split(tensor, ep, axis=0)):
            for etp_rank, shard in enumerate(split_tp(block, split_rule(name, gated), etp, name)):
                ranks[(ep_rank, etp_rank)][name] = np.ascontiguousarray(shard)
    return ranks


def check_target_layout(config, tp: int, pp: int, num_layer_list: Optional[Sequence[int]], ep: int = 1,
                        etp: Optional[int] = None) -> None:
    """ValueError naming the flag when the model cannot be laid out over tp x pp (x ep experts, each split
    over etp ranks; etp defaults to tp)."""
    if min(tp, pp, ep, tp if etp is None else etp) < 1:
        raise ValueError("--target-tensor-parallel-size, --target-pipeline-parallel-size, "
                         "--target-expert-parallel-size and --target-expert-tensor-parallel-size must be >= 1")
    dense_ffn = (config.ffn_hidden_size,) if not all(config.moe_config.is_moe_layer(i, config.num_layers)
                                                     for i in range(config.num_layers)) else ()
    for value, what in ((config.num_attention_heads, "--num-attention-heads"),
                        (config.num_query_groups, "the number of key/value groups (--num-query-groups)"),
                        *((v, "--ffn-hidden-size") for v in dense_ffn)):
        if value % tp:
            raise ValueError(f"{what} = {value} is not divisible by --target-tensor-parallel-size {tp}")
    try:  # the expert layout checks training runs, in the converter's flag names
        config.moe_config.validate_parallel(tp, ep, tp if etp is None else etp, True, config.add_bias_linear)
    except ValueError as e:
        raise ValueError(str(e).replace("--expert-model-parallel-size", "--target-expert-parallel-size")
                         .replace("--expert-tensor-parallel-size", "--target-expert-tensor-parallel-size")
                         .replace("--tensor-model-parallel-size", "--target-tensor-parallel-size")) from None
    try:
        plan_stages(config.num_layers, pp, num_layer_list)
    except ValueError as e:
        raise ValueError(str(e).replace("--pipeline-model-parallel-size", "--target-pipeline-parallel-size")
                         .replace("--num-layer-list", "--target-num-layer-list")) from None

