"""Everything that watches and steers a run from outside the maths, behind a few calls from `train()`:

- the job's timers (`--timing-log-level`, `--timing-log-option`), printed with Megatron's names after the
  log line every `--log-interval` iterations, and `save-checkpoint` after each save;
- TensorBoard / W&B scalars with Megatron's tags, from the last rank (`writers.py`);
- memory reports (`--log-memory-interval`, `--log-memory-to-tensorboard`; `memory.py`);
- MindSpore's profiler over `--profile-step-start`..`--profile-step-end` (`profiling.py`);
- `--exit-signal-handler`: every rank learns after each iteration whether any rank got the signal.

TensorBoard tags, as Megatron's training_log and evaluate_and_print_results write them (each also as
`<tag> vs samples` against consumed samples): `learning-rate`, `batch-size`, `lm loss`, `loss-scale`
(unless --no-log-loss-scale-to-tensorboard), `world-size` (--log-world-size-to-tensorboard), `grad-norm`,
`num-zeros`, `params-norm`; at evaluations `lm loss validation` (and `lm loss validation ppl` with
--log-validation-ppl-to-tensorboard). With --log-timers-to-tensorboard: `iteration-time` (seconds),
`throughput` (with --log-throughput) and each timer's maximum as `<name>-time`. With
--log-memory-to-tensorboard: `mem-host-rss-bytes`, `mem-max-host-rss-bytes` and, where the device reports
them, `mem-allocated-bytes`, `mem-max-allocated-bytes`, `mem-reserved-bytes`, `mem-max-reserved-bytes`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Optional

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core.timers import LEVEL_1_TIMERS, LEVEL_2_TIMERS, Timers, set_timers
from mindtron.training.logging import model_flops_per_token
from mindtron.training.memory import memory_stats, report_memory
from mindtron.training.profiling import ProfilerWindow
from mindtron.training.signal_handler import DistributedSignalHandler
from mindtron.training.writers import build_writers, set_writer

__all__ = ["RunMonitor", "timers_to_log"]

_MEMORY_TAGS = {"host rss": "mem-host-rss-bytes", "max host rss": "mem-max-host-rss-bytes",
                "allocated": "mem-allocated-bytes", "max allocated": "mem-max-allocated-bytes",
                "reserved": "mem-reserved-bytes", "max reserved": "mem-max-reserved-bytes"}


def timers_to_log(level: int) -> list:
    """The timer names Megatron's log line reports at `--timing-log-level level`."""
    return (list(LEVEL_1_TIMERS) if level >= 1 else []) + (list(LEVEL_2_TIMERS) if level >= 2 else [])


class RunMonitor:
    """The run's timers, writers, profiler window, memory reports and exit signal, for one `train()`."""

    def __init__(self, config, args_record: Optional[dict] = None):
        t = config.training_config
        self.config, self.t = config, t
        if t.log_memory_interval is not None and (t.log_memory_interval <= 0 or
                                                  t.log_memory_interval % max(1, t.log_interval)):
            raise ValueError(f"--log-memory-interval ({t.log_memory_interval}) must be a positive multiple of "
                             f"--log-interval ({t.log_interval})")
        if t.tensorboard_log_interval <= 0:
            raise ValueError(f"--tensorboard-log-interval must be positive, got {t.tensorboard_log_interval}")
        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self.log_interval = max(1, t.log_interval or 1)
        self.timers: Timers = set_timers(Timers(t.timing_log_level, t.timing_log_option))
        self.timer_names = timers_to_log(t.timing_log_level)
        self.writer = build_writers(t, self.rank, self.world, args_record)
        set_writer(self.writer)
        self.profiler = ProfilerWindow(t, self.rank, printer=lambda text: print(text, flush=True))
        self.signals = DistributedSignalHandler(t.exit_signal).__enter__() if t.exit_signal_handler else None
        self._flops_per_token = model_flops_per_token(config.model_config)
        self._iteration_seconds = 0.0  # since the last log line, for iteration-time
        self._iterations = 0

    # ---- per iteration ------------------------------------------------------------------------------
    def before_iteration(self, completed: int) -> None:
        """Before an iteration runs; `completed` iterations are done."""
        self.profiler.before_iteration(completed)

    def after_iteration(self, trainer, iteration: int, consumed_samples: int, result, learning_rate: float,
                        global_batch: int, elapsed_ms: float) -> None:
        """After iteration `iteration` (and its log line): scalars, memory, timers, profiler window."""
        t, writer = self.t, self.writer
        self.profiler.after_iteration(iteration)
        self._iteration_seconds += elapsed_ms / 1000.0
        self._iterations += 1
        if writer is not None and iteration % t.tensorboard_log_interval == 0:
            self._write_iteration(iteration, consumed_samples, result, learning_rate, global_batch)
        if iteration % self.log_interval:
            return
        per_iteration = self._iteration_seconds / max(1, self._iterations)
        self._iteration_seconds, self._iterations = 0.0, 0
        if writer is not None and t.log_timers_to_tensorboard:
            writer.add_scalar("iteration-time", per_iteration, iteration)
            if t.log_throughput:  # model TFLOP/s per rank, as the log line's throughput figure
                tokens = global_batch * self.config.model_config.seq_length
                writer.add_scalar("throughput", tokens * self._flops_per_token / per_iteration / self.world / 1e12,
                                  iteration)
        if t.log_memory_interval and iteration % t.log_memory_interval == 0:
            self.report_memory(f"(after {iteration} iterations)")
        if writer is not None and t.log_memory_to_tensorboard:
            for key, value in memory_stats().items():
                writer.add_scalar(_MEMORY_TAGS[key], value, iteration)
        if t.log_timers_to_tensorboard:  # every rank takes part in gathering the times; don't reset them
            self.timers.write(self.timer_names, writer, iteration, normalizer=self.log_interval, reset=False)
        self.timers.log(self.timer_names, normalizer=self.log_interval)

    def _write_iteration(self, iteration: int, samples: int, result, learning_rate: float, global_batch: int):
        t = self.t
        scalars: Dict[str, float] = {"learning-rate": learning_rate, "batch-size": global_batch,
                                     "lm loss": result.loss}
        if t.log_loss_scale_to_tensorboard:
            scalars["loss-scale"] = result.loss_scale
        if t.log_world_size_to_tensorboard:
            scalars["world-size"] = self.world
        if result.grad_norm is not None:
            scalars["grad-norm"] = result.grad_norm
        if getattr(result, "num_zeros", None) is not None:
            scalars["num-zeros"] = result.num_zeros
        if getattr(result, "params_norm", None) is not None:
            scalars["params-norm"] = result.params_norm
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, iteration)
            self.writer.add_scalar(tag + " vs samples", value, samples)
        moe = getattr(result, "moe", None)
        if moe is not None:  # Megatron's MoE tracker: each loss's mean over MoE layers, per layer on request
            for name, value in moe.losses.items():
                self.writer.add_scalar(name, value, iteration)
            if self.config.model_config.moe_config.moe_per_layer_logging:
                for name, values in moe.per_layer.items():
                    for layer, value in enumerate(values):
                        self.writer.add_scalar(f"moe/{name}_layer_{layer}", value, iteration)

    def report_memory(self, name: str) -> None:
        """Megatron's memory line, printed by the first data-parallel rank of each model-parallel group."""
        if ps.get_data_parallel_rank() == 0:
            print(report_memory(name, self.rank), flush=True)

    # ---- evaluation, checkpoints, stopping ------------------------------------------------------------
    def evaluation(self, iteration: int, consumed_samples: int, loss: float, key: str = "lm loss") -> None:
        """Validation scalars: `<key> validation` (and its ppl) at the iteration and vs samples."""
        if self.writer is None:
            return
        self.writer.add_scalar(f"{key} validation", loss, iteration)
        self.writer.add_scalar(f"{key} validation vs samples", loss, consumed_samples)
        if self.t.log_validation_ppl_to_tensorboard:
            ppl = math.exp(min(20.0, loss))
            self.writer.add_scalar(f"{key} validation ppl", ppl, iteration)
            self.writer.add_scalar(f"{key} validation ppl vs samples", ppl, consumed_samples)

    @contextmanager
    def saving(self):
        """Times a checkpoint save (`save-checkpoint`, level 0) and prints it, as Megatron does."""
        timer = self.timers("save-checkpoint", log_level=0)
        timer.start()
        try:
            yield
        finally:
            timer.stop()
        self.timers.log(["save-checkpoint"])

    def stop_requested(self) -> bool:
        """With --exit-signal-handler: did any rank get the exit signal? (Collective; False otherwise.)"""
        return self.signals is not None and self.signals.any_rank_received()

    def close(self) -> None:
        """End of training: close the profiler window, flush the writers, restore the signal handler."""
        self.profiler.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            set_writer(None)
        if self.signals is not None:
            self.signals.release()
        set_timers(Timers(0, self.t.timing_log_option))

