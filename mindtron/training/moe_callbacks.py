"""The MoE tools of documents 000 and 001 as callbacks: drop rate, token distribution (files and log line),
and the callbacks mindtron adds when MoE options ask for them. The hot-expert monitor is in
hot_expert_monitor.py.

All of them read the router statistics of each step, `StepResult.moe` (MoEStepStats): per MoE layer (global
0-based index) the pairs routed to each expert before capacity dropping (`tokens_per_expert`) and those kept
(`kept_tokens_per_expert`), already summed over the micro-batches and every data-, tensor-, context-,
expert-parallel rank and pipeline stage, so every rank holds the same numbers.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from mindtron.parallel_core import comm
from mindtron.training.callbacks import Callback, CallbackList, TrainState, register_callback
from mindtron.training.hot_expert_monitor import ColdHotExpertMonitor
from mindtron.training.token_distribution import token_distribution_file

__all__ = ["MoEDropRateCallback", "TokenDistributionMonitor", "SummaryMonitor", "ColdHotExpertMonitor",
           "default_moe_callbacks", "drop_rate"]


class _IntervalCounts:
    """Per-layer routed and kept pair counts summed since the last report."""

    def __init__(self):
        self.routed: Dict[int, np.ndarray] = {}
        self.kept: Dict[int, np.ndarray] = {}
        self.first: Optional[int] = None

    def add(self, iteration: int, stats) -> None:
        if self.first is None:
            self.first = iteration
        for layer, routed in stats.tokens_per_expert.items():
            kept = stats.kept_tokens_per_expert[layer]
            self.routed[layer] = self.routed.get(layer, 0) + np.asarray(routed, np.int64)
            self.kept[layer] = self.kept.get(layer, 0) + np.asarray(kept, np.int64)

    def span(self, iteration: int) -> str:
        first = self.first if self.first is not None else iteration
        return f"iteration {iteration}" if first == iteration else f"iterations {first}-{iteration}"

    def clear(self) -> None:
        self.routed.clear()
        self.kept.clear()
        self.first = None


def _moe_config(state: TrainState):
    moe = state.config.model_config.moe_config
    if not moe.enabled:
        raise ValueError("the MoE callbacks need an MoE model: set --num-experts")
    return moe


@register_callback()
class MoEDropRateCallback(Callback):
    """Document 001's MoE drop rate: per MoE layer, the share of routed (token, expert) pairs that the capacity
    limit dropped, printed every log interval (over the iterations since the last print) and written to
    TensorBoard as `moe/drop_rate_layer_<i>` when a writer is open.

    expert_num, capacity_factor and num_layers are the document's arguments; mindtron reads them from the run
    and checks that given values agree with it (a capacity factor of None or negative: dropless).
    mtp_depth: multi-token-prediction layers, which mindtron models do not have yet: accepted, 0 counted.
    `log_interval` defaults to --log-interval. After each print, `last` holds {layer number (1-based): rate}.
    """

    def __init__(self, expert_num: Optional[int] = None, capacity_factor: Optional[float] = None,
                 num_layers: Optional[int] = None, mtp_depth: int = 0, log_interval: Optional[int] = None):
        if mtp_depth is None or int(mtp_depth) < 0:
            raise ValueError(f"MoEDropRateCallback: mtp_depth must be a number of layers >= 0, got {mtp_depth!r}")
        self.expert_num, self.capacity_factor, self.num_layers = expert_num, capacity_factor, num_layers
        self.mtp_depth, self.log_interval = int(mtp_depth), log_interval
        self.counts = _IntervalCounts()
        self.last: Dict[int, float] = {}

    def on_train_begin(self, state: TrainState) -> None:
        moe, model = _moe_config(state), state.config.model_config
        if self.expert_num is not None and int(self.expert_num) != moe.num_experts:
            raise ValueError(f"MoEDropRateCallback: expert_num {self.expert_num} but the model has --num-experts "
                             f"{moe.num_experts}")
        if self.num_layers is not None and int(self.num_layers) != model.num_layers:
            raise ValueError(f"MoEDropRateCallback: num_layers {self.num_layers} but the model has --num-layers "
                             f"{model.num_layers}")
        given = self.capacity_factor
        given = None if given is None or float(given) < 0 else float(given)
        if self.capacity_factor is not None and given != moe.moe_expert_capacity_factor:
            run = moe.moe_expert_capacity_factor
            raise ValueError(f"MoEDropRateCallback: capacity_factor {self.capacity_factor} but the run's "
                             f"--moe-expert-capacity-factor is {'unset (dropless)' if run is None else run}")
        if self.log_interval is None:
            self.log_interval = max(1, state.config.training_config.log_interval or 1)
        if self.mtp_depth:
            state.log(f"MoEDropRateCallback: mtp_depth {self.mtp_depth}: mindtron models have no "
                      "multi-token-prediction layers yet, so none of their drop rates is reported")

    def on_train_step_end(self, state: TrainState) -> None:
        if state.result is None or state.result.moe is None:
            return
        self.counts.add(state.iteration, state.result.moe)
        if state.iteration % self.log_interval:
            return
        self.last = {layer + 1: drop_rate(self.counts.routed[layer], self.counts.kept[layer])
                     for layer in sorted(self.counts.routed)}
        factor = state.config.model_config.moe_config.moe_expert_capacity_factor
        parts = [f"layer {layer}: {rate:.4f}" for layer, rate in self.last.items()]
        state.log(f" MoE drop rate ({self.counts.span(state.iteration)}, capacity factor "
                  f"{'none' if factor is None else factor}): " + " | ".join(parts) + " |")
        from mindtron.training.writers import get_writer
        writer = get_writer()
        if writer is not None:
            for layer, rate in self.last.items():
                writer.add_scalar(f"moe/drop_rate_layer_{layer}", rate, state.iteration)
        self.counts.clear()


def drop_rate(routed: np.ndarray, kept: np.ndarray) -> float:
    """Dropped pairs / routed pairs (0 when nothing was routed)."""
    total = int(np.sum(routed))
    return 0.0 if total == 0 else (total - int(np.sum(kept))) / total


@register_callback()
class TokenDistributionMonitor(Callback):
    """Document 000's token distribution.

    With `save_dir`: every `interval` iterations, one file per MoE layer, `layer-<L>_<iteration>.npy` (L the
    global 0-based layer index), holding an int64 array [2, num_experts]: row 0 the pairs routed to each
    expert before capacity dropping, row 1 those kept, summed over the iteration's micro-batches and all
    ranks (written by rank 0; token_distribution.py reads them, tools/moe_token_distribution.py draws them).
    With `log`: every log interval, per MoE layer, the most and the least loaded expert's routed pairs over
    the mean (1.00 / 1.00 is perfect balance), over the iterations since the last line.
    """

    def __init__(self, save_dir: Optional[str] = None, interval: int = 1, log: bool = False,
                 log_interval: Optional[int] = None):
        if save_dir is None and not log:
            raise ValueError("TokenDistributionMonitor: give save_dir (where the .npy files go) and/or log: true")
        if int(interval) < 1:
            raise ValueError(f"TokenDistributionMonitor: interval must be >= 1 iteration, got {interval}")
        self.save_dir, self.interval, self.log, self.log_interval = save_dir, int(interval), bool(log), log_interval
        self.counts = _IntervalCounts()
        self.last: Dict[int, tuple] = {}
        self.written: List[str] = []

    def on_train_begin(self, state: TrainState) -> None:
        _moe_config(state)
        if self.log_interval is None:
            self.log_interval = max(1, state.config.training_config.log_interval or 1)
        if self.save_dir is not None and comm.get_rank() == 0:
            os.makedirs(self.save_dir, exist_ok=True)

    def on_train_step_end(self, state: TrainState) -> None:
        stats = state.result.moe if state.result is not None else None
        if stats is None:
            return
        if self.save_dir is not None and state.iteration % self.interval == 0 and comm.get_rank() == 0:
            for layer, routed in sorted(stats.tokens_per_expert.items()):
                counts = np.stack([routed, stats.kept_tokens_per_expert[layer]]).astype(np.int64)
                path = token_distribution_file(self.save_dir, layer, state.iteration)
                np.save(path, counts)
                self.written.append(path)
        if not self.log:
            return
        self.counts.add(state.iteration, stats)
        if state.iteration % self.log_interval:
            return
        self.last = {}
        for layer in sorted(self.counts.routed):
            routed = self.counts.routed[layer].astype(np.float64)
            mean = routed.mean()
            self.last[layer + 1] = ((routed.max() / mean, routed.min() / mean) if mean > 0 else (0.0, 0.0))
        parts = [f"layer {layer}: max {hi:.2f} min {lo:.2f}" for layer, (hi, lo) in self.last.items()]
        state.log(f" MoE expert load over the mean ({self.counts.span(state.iteration)}): " + " | ".join(parts)
                  + " |")
        self.counts.clear()


@register_callback("SummaryMonitor")
def SummaryMonitor(summary_dir: str, collect_freq: int = 1, collect_tensor_freq: int = 1,
                   keep_default_action: bool = True, export_options: Optional[dict] = None) -> TokenDistributionMonitor:
    """Document 000's YAML entry `type: SummaryMonitor` for the token distribution: the .npy files go to
    `summary_dir` every `collect_tensor_freq` iterations. Only that export exists here (MindSpore's summary
    collection is not part of mindtron): `export_options` may only ask for npy tensors; `collect_freq` and
    `keep_default_action` are accepted without effect."""
    fmt = (export_options or {}).get("tensor_format", "npy")
    if fmt != "npy" or set(export_options or {}) - {"tensor_format"}:
        raise ValueError(f"SummaryMonitor: export_options {export_options!r}: mindtron exports the token "
                         "distribution as {'tensor_format': 'npy'} only")
    return TokenDistributionMonitor(save_dir=str(summary_dir), interval=int(collect_tensor_freq))


def default_moe_callbacks(config, existing: CallbackList) -> List[Callback]:
    """The callbacks MoE options ask for, unless the run already has one of that kind:
    --save-token-distribution / --log-token-distribution (TokenDistributionMonitor), --callback-moe-droprate
    (MoEDropRateCallback) and --enable-cold-hot-expert (ColdHotExpertMonitor)."""
    moe, t = config.model_config.moe_config, config.training_config
    out: List[Callback] = []
    if not moe.enabled:
        return out
    monitors = existing.find(TokenDistributionMonitor)
    need_save = moe.save_token_distribution and not any(m.save_dir for m in monitors)
    need_log = t.log_token_distribution and not any(m.log for m in monitors)
    if need_save or need_log:
        save_dir = None
        if need_save:
            save_dir = t.token_distribution_dir or (os.path.join(t.output_dir, "token_distribution")
                                                    if t.output_dir else None)
            if save_dir is None:
                raise ValueError("--save-token-distribution (moe_config.save_token_distribution) needs a directory: "
                                 "set --token-distribution-dir (or --save, which puts them in <save>/"
                                 "token_distribution, or a SummaryMonitor callback's summary_dir)")
        out.append(TokenDistributionMonitor(save_dir, interval=t.token_distribution_interval, log=need_log))
    if moe.callback_moe_droprate and not existing.find(MoEDropRateCallback):
        out.append(MoEDropRateCallback())
    if moe.enable_cold_hot_expert and not existing.find(ColdHotExpertMonitor):
        out.append(ColdHotExpertMonitor())
    return out
