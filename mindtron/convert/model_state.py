"""The whole model between reading and writing: canonical names -> full tensors, and how shards become it.

Every reader turns each source file's model state into a `ShardState` (canonical, stage-local names, routed
experts stacked per file) and hands them to `assemble`, which places layers by their stage's offset, merges
tensor-parallel shards by each tensor's split rule, concatenates the experts of the expert-parallel ranks
in rank order (global expert = ep_rank x local count + local index) after merging their expert
tensor-parallel shards, and checks the result against the shapes the model settings predict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mindtron.convert import names as N
from mindtron.convert.report import ConversionReport
from mindtron.convert.shards import ReplicaMismatch, local_layer_count, merge_tp, split_rule, stage_offsets
from mindtron.convert.spec import ModelSpec


@dataclass
class ShardState:
    """One source file's model tensors: tensor-parallel rank, stage in model order, canonical local names,
    and the expert-parallel rank whose experts it holds."""

    tp_rank: int
    stage: int  # chunk * pp + pipeline rank for virtual stages; the pipeline rank otherwise
    tensors: Dict[str, np.ndarray]
    where: str
    ep_rank: int = 0
    etp_rank: Optional[int] = None  # the expert tensor-parallel shard it holds; None: tp_rank % etp


@dataclass
class FullCheckpoint:
    """A whole model independent of any parallel layout, with what is needed to write it anywhere."""

    spec: ModelSpec
    tensors: Dict[str, np.ndarray]  # canonical names, global layer indices, full shapes
    iteration: int = 0
    consumed_samples: int = 0


def assemble(shards: Sequence[ShardState], tp: int, stages: int, spec: ModelSpec, report: ConversionReport,
             etp: Optional[int] = None) -> Dict[str, np.ndarray]:
    """The whole model's tensors from every (tensor rank, stage, expert rank) shard; `etp` is the source's
    expert tensor-parallel size (default tp)."""
    etp = tp if etp is None else etp
    ep = 1 + max(s.ep_rank for s in shards)
    dense: Dict[Tuple[int, int], ShardState] = {}
    experts: Dict[Tuple[int, int, int], ShardState] = {}
    copies: List[Tuple[ShardState, ShardState, bool]] = []  # (copy, original, experts?) to compare
    for s in sorted(shards, key=lambda s: (s.stage, s.ep_rank, s.tp_rank)):
        if (s.tp_rank, s.stage) in dense:
            copies.append((s, dense[(s.tp_rank, s.stage)], False))
        else:
            dense[(s.tp_rank, s.stage)] = s
        key = (s.stage, s.ep_rank, s.tp_rank % etp if s.etp_rank is None else s.etp_rank)
        if key in experts:
            copies.append((s, experts[key], True))
        else:
            experts[key] = s
    missing = [(r, st) for st in range(stages) for r in range(tp) if (r, st) not in dense]
    if missing:
        raise ValueError(f"shards missing for (tensor rank, stage) {missing}: the checkpoint is incomplete")
    counts: List[int] = []
    for stage in range(stages):
        first = dense[(0, stage)]
        for other in (s for s in shards if s.stage == stage):
            if set(other.tensors) != set(first.tensors):
                diff = sorted(set(other.tensors) ^ set(first.tensors))
                raise ValueError(f"{other.where} and {first.where} hold different tensors ({diff[:4]}); every "
                                 "tensor- and expert-parallel rank of a stage must hold the same names")
        counts.append(local_layer_count(list(first.tensors), first.where))
    _check_copies(copies, report)
    offsets = stage_offsets(counts)
    full: Dict[str, np.ndarray] = {}
    head_copy = None
    for stage in range(stages):
        where = dense[(0, stage)].where
        for local in dense[(0, stage)].tensors:
            rule = split_rule(local, spec.gated)
            if N.is_expert(local):
                merged = np.concatenate([_merge(local, [_expert_shard(experts, stage, e, r, where)
                                                        for r in range(etp)], rule, report)
                                         for e in range(ep)], axis=0)
            else:
                merged = _merge(local, [dense[(rank, stage)].tensors[local] for rank in range(tp)], rule, report,
                                where)
            if local == N.HEAD_COPY:
                head_copy = merged
                continue
            name = N.shift_layer(local, offsets[stage])
            if name in full:
                raise ValueError(f"{name} appears on more than one pipeline stage (second: {where})")
            full[name] = merged
    if head_copy is not None:
        word = full.get(N.WORD)
        if word is None:
            full[N.WORD] = head_copy  # no stage held the embedding itself: the copy is all there is
        elif word.shape != head_copy.shape or not np.array_equal(word, head_copy):
            report.warn("the last stage's copy of the tied word embedding differs from the first stage's "
                        "embedding; the first stage's is used (as Megatron does after its embedding sync)")
        report.ignore("last stage's copy of the tied word embedding (the first stage's is kept)", N.HEAD_COPY)
    return full


def _expert_shard(experts: Dict[Tuple[int, int, int], ShardState], stage: int, ep_rank: int, etp_rank: int,
                  where: str) -> ShardState:
    shard = experts.get((stage, ep_rank, etp_rank))
    if shard is None:
        raise ValueError(f"no file holds the experts of expert-parallel rank {ep_rank} (expert tensor-parallel rank "
                         f"{etp_rank}) for the stage of {where}: the checkpoint is incomplete")
    return shard


def _merge(name: str, parts: Sequence, rule, report: ConversionReport, where: str = "") -> np.ndarray:
    """merge_tp of `parts` (arrays, or the ShardStates holding `name`), warning when replicas differ."""
    where = where or parts[0].where
    arrays = [p.tensors[name] if isinstance(p, ShardState) else p for p in parts]
    try:
        return merge_tp(arrays, rule)
    except ReplicaMismatch as e:
        report.warn(f"{name} differs between tensor-parallel ranks of {where} (max diff {e.args[0]:.3g}); rank 0's "
                    "copy is used")
        return arrays[0]


def _check_copies(copies: Sequence[Tuple[ShardState, ShardState, bool]], report: ConversionReport) -> None:
    """Files that hold the same weights again (dense weights in every expert-parallel rank's file, whole experts
    in every tensor-parallel rank's file with expert tensor parallel 1) must agree; a difference is reported."""
    for copy, original, expert_part in copies:
        for name, tensor in copy.tensors.items():
            if N.is_expert(name) != expert_part:
                continue
            kept = original.tensors[name]
            if kept.shape != tensor.shape or not np.array_equal(kept, tensor):
                report.warn(f"{name} differs between {original.where} and {copy.where}, which should hold the same "
                            f"copy; the first is used")


def validate(full: Dict[str, np.ndarray], spec: ModelSpec, where: str) -> None:
    """ValueError listing tensors that are missing, unexpected or misshapen for the model settings."""
    config = spec.config()
    expected = N.expected_shapes(config, spec.source_vocab_rows)
    problems = _mlp_kind_mismatches(full, expected)
    for name in sorted(set(expected) - set(full)):
        problems.append(f"missing {name} (decided by {N.setting_hint(name)})")
    for name in sorted(set(full) - set(expected)):
        problems.append(f"unexpected {name} {list(full[name].shape)}: the settings leave no place for it "
                        f"(decided by {N.setting_hint(name)})")
    for name in sorted(set(full) & set(expected)):
        if tuple(full[name].shape) != tuple(expected[name]):
            problems.append(f"{name} has shape {list(full[name].shape)}, the settings give {list(expected[name])} "
                            f"(decided by {N.setting_hint(name)})")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"{where} does not match the model settings ({spec.describe()}):\n  {shown}\n"
                         "Fix the settings with the flags named above (they override the checkpoint's stored "
                         "arguments).")


def _mlp_kind_mismatches(full: Dict[str, np.ndarray], expected: Dict[str, tuple]) -> List[str]:
    """One line per kind of layer whose MLP the checkpoint holds as dense and the settings make MoE, or back."""
    def layers(names, rest):
        return sorted(p[0] for p in map(N.layer_of, names) if p is not None and p[1] == rest)

    dense_held, moe_held = layers(full, "mlp.dense_h_to_4h.weight"), layers(full, "mlp.router.weight")
    dense_wanted, moe_wanted = layers(expected, "mlp.dense_h_to_4h.weight"), layers(expected, "mlp.router.weight")
    lines = []
    wrong = sorted(set(dense_held) & set(moe_wanted))
    if wrong:
        lines.append(f"layers {wrong} hold a dense MLP where the settings put Mixture-of-Experts layers "
                     "(decided by --num-experts, --moe-layer-freq)")
    wrong = sorted(set(moe_held) & set(dense_wanted))
    if wrong:
        lines.append(f"layers {wrong} hold Mixture-of-Experts MLPs where the settings put dense ones (decided by "
                     "--num-experts, --moe-layer-freq)")
    return lines


def observe_shapes(spec: ModelSpec, full: Dict[str, np.ndarray], where: str) -> None:
    """Take what only the tensors tell (padded vocabulary rows, position table rows) into the spec."""
    if N.WORD not in full:
        raise ValueError(f"{where} holds no word embedding ({N.WORD}); the checkpoint is incomplete")
    spec.observe_vocab_rows(int(full[N.WORD].shape[0]))
    if N.POSITION in full and spec.fields.get("max_position_embeddings") is None:
        spec.fields["max_position_embeddings"] = int(full[N.POSITION].shape[0])
