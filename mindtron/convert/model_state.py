"""The whole model between reading and writing: canonical names -> full tensors, and how shards become it.

Every reader turns each source file's model state into a `ShardState` (canonical, stage-local names) and
hands them to `assemble`, which places layers by their stage's offset, merges tensor-parallel shards by
each tensor's split rule, and checks the result against the shapes the model settings predict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from mindtron.convert import names as N
from mindtron.convert.report import ConversionReport
from mindtron.convert.shards import ReplicaMismatch, local_layer_count, merge_tp, split_rule, stage_offsets
from mindtron.convert.spec import ModelSpec


@dataclass
class ShardState:
    """One source file's model tensors: tensor-parallel rank, stage in model order, canonical local names."""

    tp_rank: int
    stage: int  # chunk * pp + pipeline rank for virtual stages; the pipeline rank otherwise
    tensors: Dict[str, np.ndarray]
    where: str


@dataclass
class FullCheckpoint:
    """A whole model independent of any parallel layout, with what is needed to write it anywhere."""

    spec: ModelSpec
    tensors: Dict[str, np.ndarray]  # canonical names, global layer indices, full shapes
    iteration: int = 0
    consumed_samples: int = 0


def assemble(shards: Sequence[ShardState], tp: int, stages: int, spec: ModelSpec,
             report: ConversionReport) -> Dict[str, np.ndarray]:
    """The whole model's tensors from every (tensor rank, stage) shard."""
    grid = {(s.tp_rank, s.stage): s for s in shards}
    missing = [(r, st) for st in range(stages) for r in range(tp) if (r, st) not in grid]
    if missing:
        raise ValueError(f"shards missing for (tensor rank, stage) {missing}: the checkpoint is incomplete")
    counts: List[int] = []
    for stage in range(stages):
        first = grid[(0, stage)]
        for rank in range(1, tp):
            other = grid[(rank, stage)]
            if set(other.tensors) != set(first.tensors):
                diff = sorted(set(other.tensors) ^ set(first.tensors))
                raise ValueError(f"{other.where} and {first.where} hold different tensors ({diff[:4]}); every "
                                 "tensor-parallel rank of a stage must hold the same names")
        counts.append(local_layer_count(list(first.tensors), first.where))
    offsets = stage_offsets(counts)
    full: Dict[str, np.ndarray] = {}
    head_copy = None
    for stage in range(stages):
        names = grid[(0, stage)].tensors
        for local in names:
            parts = [grid[(rank, stage)].tensors[local] for rank in range(tp)]
            rule = split_rule(local, spec.gated)
            try:
                merged = merge_tp(parts, rule)
            except ReplicaMismatch as e:
                report.warn(f"{local} differs between tensor-parallel ranks of {grid[(0, stage)].where} (max diff "
                            f"{e.args[0]:.3g}); rank 0's copy is used")
                merged = parts[0]
            if local == N.HEAD_COPY:
                head_copy = merged
                continue
            name = N.shift_layer(local, offsets[stage])
            if name in full:
                raise ValueError(f"{name} appears on more than one pipeline stage (second: {grid[(0, stage)].where})")
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


def validate(full: Dict[str, np.ndarray], spec: ModelSpec, where: str) -> None:
    """ValueError listing tensors that are missing, unexpected or misshapen for the model settings."""
    config = spec.config()
    expected = N.expected_shapes(config, spec.source_vocab_rows)
    problems = []
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


def observe_shapes(spec: ModelSpec, full: Dict[str, np.ndarray], where: str) -> None:
    """Take what only the tensors tell (padded vocabulary rows, position table rows) into the spec."""
    if N.WORD not in full:
        raise ValueError(f"{where} holds no word embedding ({N.WORD}); the checkpoint is incomplete")
    spec.source_vocab_rows = int(full[N.WORD].shape[0])
    if N.POSITION in full and spec.fields.get("max_position_embeddings") is None:
        spec.fields["max_position_embeddings"] = int(full[N.POSITION].shape[0])
