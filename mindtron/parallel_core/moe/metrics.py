"""Per-layer MoE statistics of one iteration: the auxiliary losses Megatron logs, and the token counts.

Routers `record()` a value per (name, layer) during the forward passes of an iteration; `report()` at the
end of the iteration reduces them as Megatron's MoE metrics tracker does (sum over the pipeline group, then
the entry's reduce group, an average over its avg group and over data parallel), scales them by
1 / micro-batches, and gives the mean over MoE layers and the per-layer values. Token counts per expert
(routed before and kept after capacity dropping) are summed over the data- and expert-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from mindspore import Tensor

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps


# How each statistic is reduced over the job, as Megatron's routers record them: (group summed over, group
# averaged over, then averaged over data parallel). Fixed per name, so that every rank (also a pipeline
# stage without MoE layers) takes part in the same collectives.
REDUCTIONS = {
    "load_balancing_loss": ("tp-cp", None, True),
    "seq_load_balancing_loss": ("tp-cp", None, True),
    "global_load_balancing_loss": ("tp-dp-cp", None, False),
    "z_loss": (None, "tp-dp-cp", True),
}


def _group(kind: Optional[str]):
    if kind is None:
        return None
    if kind == "tp-cp":
        return ps.get_tensor_and_context_parallel_group()
    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


@dataclass
class MoEStepStats:
    """What one iteration's MoE layers report."""

    losses: Dict[str, float] = field(default_factory=dict)
    """Mean over MoE layers of each tracked auxiliary loss (Megatron's `load_balancing_loss`, ...)."""
    per_layer: Dict[str, List[float]] = field(default_factory=dict)
    """Each tracked loss per layer (0-based global layer index; dense layers read 0)."""
    tokens_per_expert: Dict[int, np.ndarray] = field(default_factory=dict)
    """Global layer index -> tokens routed to each expert in the iteration, before capacity dropping,
    summed over micro-batches and all data-parallel ranks ([num_experts])."""
    kept_tokens_per_expert: Dict[int, np.ndarray] = field(default_factory=dict)
    """The same after capacity dropping (equal to tokens_per_expert when dropless)."""


class MoEMetricsTracker:
    """Collects router statistics during an iteration and reduces them at its end."""

    def __init__(self):
        self._values: Dict[str, np.ndarray] = {}         # name -> [num_layers], this rank's sums
        self._tokens: Dict[int, List[np.ndarray]] = {}  # layer -> [routed, kept], this rank's tokens

    def record(self, name: str, value: Tensor, layer_number: int, num_layers: int) -> None:
        """Add a scalar (a key of REDUCTIONS) for layer `layer_number` (1-based, global)."""
        if name not in REDUCTIONS:
            raise KeyError(f"unknown MoE statistic {name!r}; known: {sorted(REDUCTIONS)}")
        values = self._values.setdefault(name, np.zeros(num_layers, np.float64))
        values[layer_number - 1] += float(value.asnumpy())

    def record_tokens(self, layer_number: int, routed: np.ndarray, kept: np.ndarray) -> None:
        """Add this rank's token counts per expert of one forward of layer `layer_number` (1-based)."""
        counts = self._tokens.setdefault(layer_number - 1, [np.zeros_like(routed, np.int64),
                                                            np.zeros_like(kept, np.int64)])
        counts[0] += routed.astype(np.int64)
        counts[1] += kept.astype(np.int64)

    def clear(self) -> None:
        """Forget everything recorded (start of an iteration)."""
        self._values.clear()
        self._tokens.clear()

    def report(self, names: List[str], num_layers: int, moe_layers: int, loss_scale: float,
               num_experts: Optional[int] = None, moe_layer_indices: Optional[List[int]] = None) -> MoEStepStats:
        """Reduce over the job and summarise; every rank must call it with the same arguments.

        `loss_scale` is 1 / micro-batches (Megatron's moe_loss_scale). `moe_layer_indices` (global, 0-based)
        with `num_experts` also returns the token counts summed over the data-parallel ranks.
        """
        stats = MoEStepStats()
        pp_group = ps.get_pipeline_model_parallel_group()
        dp_group = ps.get_data_parallel_group(with_context_parallel=False)
        for name in names:
            reduce_kind, avg_kind, dp_avg = REDUCTIONS[name]
            values = Tensor(self._values.get(name, np.zeros(num_layers)).astype(np.float32))
            values = comm.all_reduce(values, pp_group)
            if reduce_kind is not None:
                values = comm.all_reduce(values, _group(reduce_kind))
            if avg_kind is not None:
                values = comm.all_reduce(values, _group(avg_kind)) / _group(avg_kind).size
            if dp_avg:
                values = comm.all_reduce(values, dp_group) / dp_group.size
            per_layer = values.asnumpy().astype(np.float64) * loss_scale
            stats.per_layer[name] = per_layer.tolist()
            stats.losses[name] = float(per_layer.sum() / max(moe_layers, 1))
        if moe_layer_indices and num_experts:
            stats.tokens_per_expert, stats.kept_tokens_per_expert = self._token_totals(moe_layer_indices,
                                                                                        num_experts)
        self.clear()
        return stats

    def _token_totals(self, layers: List[int], num_experts: int):
        # One message: [layers, 2, experts] of this rank's counts, summed over every rank that routes other
        # tokens (tp x dp x cp: MoE under tensor parallelism requires sequence parallelism, so tp ranks route
        # different parts of the sequence) and over pipeline stages (each layer lives on one stage).
        local = np.zeros((len(layers), 2, num_experts), np.float32)
        for row, layer in enumerate(layers):
            if layer in self._tokens:
                local[row] = np.stack(self._tokens[layer])
        group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        total = comm.all_reduce(comm.all_reduce(Tensor(local), group), ps.get_pipeline_model_parallel_group())
        total = np.rint(total.asnumpy()).astype(np.int64)
        routed = {layer: total[row, 0] for row, layer in enumerate(layers)}
        kept = {layer: total[row, 1] for row, layer in enumerate(layers)}
        return routed, kept


_TRACKER = MoEMetricsTracker()


def get_moe_metrics_tracker() -> MoEMetricsTracker:
    """The process-wide tracker the routers record into."""
    return _TRACKER
