"""The global batch size as a function of consumed samples (Megatron's num-microbatches calculators).

Three schedules, as Megatron-Core computes them:

- constant: `--global-batch-size` every iteration. With `--decrease-batch-size-if-needed` the running batch
  is rounded down to a multiple of micro batch x data-parallel size.
- ramp-up, `--rampup-batch-size START INCR SAMPLES` (Megatron-Core <= 0.15's RampupBatchsizeNumMicroBatches-
  Calculator): the batch starts at START and grows by INCR every SAMPLES / ((GLOBAL - START) / INCR) consumed
  samples (a float interval, truncated), reaching `--global-batch-size` once more than SAMPLES samples are
  consumed. Megatron-Core 0.19 still parses the flag but ignores it with a deprecation warning; mindtron
  keeps its meaning.
- step schedule, `--step-batch-size-schedule "THRESHOLD:BS THRESHOLD:BS ..."` (Megatron-Core 0.19's
  StepBatchsizeNumMicroBatchesCalculator): pairs separated by spaces or commas; each number may carry a
  suffix K, M, B or T (x1e3, 1e6, 1e9, 1e12) and may be fractional ("2.4B"); thresholds are tokens and
  become samples by integer division by `--seq-length` (samples if no sequence length is given); sorted,
  the first must be 0 and they must increase strictly; the batch is the one of the last threshold at or
  below the consumed samples.

The number of micro-batches of an iteration is the running batch / (micro batch x data-parallel size); the
divisibility of the current batch is checked when an iteration starts (as Megatron's update with
consistency_check=True does), so an early, smaller batch may be left unchecked until it is reached.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

__all__ = ["BatchSchedule", "build_batch_schedule", "parse_step_schedule", "train_iters_for_samples"]

_SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}


def _number(text: str, where: str) -> int:
    value = text.strip().upper()
    scale = 1
    if value and value[-1] in _SUFFIXES:
        scale, value = _SUFFIXES[value[-1]], value[:-1]
    try:
        return int(float(value) * scale)
    except ValueError:
        raise ValueError(f"--step-batch-size-schedule: {where} {text!r} is not a number (digits with an "
                         "optional K/M/B/T suffix)") from None


def parse_step_schedule(text: str, seq_length: Optional[int] = None) -> List[Tuple[int, int]]:
    """"0:768 250B:1536 ..." -> [(threshold in samples, global batch size), ...], sorted and checked."""
    entries = str(text).strip().replace(",", " ").split()
    if not entries:
        raise ValueError("--step-batch-size-schedule is empty; write pairs THRESHOLD:BATCH such as \"0:16 1M:32\"")
    schedule = []
    for entry in entries:
        if ":" not in entry:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} is not THRESHOLD:BATCH_SIZE")
        threshold_text, batch_text = entry.split(":", 1)
        threshold = _number(threshold_text, "threshold")
        if seq_length:
            threshold //= seq_length  # thresholds are tokens when the sequence length is known
        schedule.append((threshold, _number(batch_text, "batch size")))
    schedule.sort(key=lambda pair: pair[0])
    if schedule[0][0] != 0:
        raise ValueError(f"--step-batch-size-schedule: the first threshold must be 0, got {schedule[0][0]} samples")
    for (before, _), (after, _) in zip(schedule, schedule[1:]):
        if after <= before:
            raise ValueError(f"--step-batch-size-schedule: thresholds must increase strictly, got {before} then "
                             f"{after} samples" + (" (thresholds are tokens, divided by --seq-length)"
                                                   if seq_length else ""))
    for _, batch in schedule:
        if batch <= 0:
            raise ValueError(f"--step-batch-size-schedule: batch sizes must be positive, got {batch}")
    return schedule


class BatchSchedule:
    """Global batch size, running batch size and micro-batch count for a number of consumed samples."""

    def __init__(self, micro_batch_size: int, data_parallel_size: int, global_batch_size: int,
                 steps: Optional[Sequence[Tuple[int, int]]] = None,
                 rampup: Optional[Tuple[int, int, int]] = None, decrease_batch_size_if_needed: bool = False):
        self.micro_batch_size, self.data_parallel_size = int(micro_batch_size), int(data_parallel_size)
        self.per_micro_batch = self.micro_batch_size * self.data_parallel_size
        if self.per_micro_batch <= 0:
            raise ValueError("micro batch size x data-parallel size must be positive")
        self.steps = list(steps) if steps else None
        self.rampup = tuple(int(v) for v in rampup) if rampup else None
        self.decrease_batch_size_if_needed = bool(decrease_batch_size_if_needed)
        if self.steps and self.decrease_batch_size_if_needed:
            raise ValueError("--step-batch-size-schedule and --decrease-batch-size-if-needed exclude each other")
        self.global_batch_size = int(self.steps[-1][1] if self.steps else global_batch_size)
        """The batch after any ramp (the schedule's last batch size)."""
        if self.rampup is not None:
            self._check_rampup()

    def _check_rampup(self) -> None:
        start, increment, samples = self.rampup
        if start <= 0 or increment <= 0 or samples < 0:
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: the start and increment must be "
                             "positive and the ramp-up samples non-negative")
        diff = self.global_batch_size - start
        if diff < 0:
            raise ValueError(f"--rampup-batch-size start {start} exceeds --global-batch-size {self.global_batch_size}")
        if diff % increment:
            raise ValueError(f"--global-batch-size {self.global_batch_size} minus the ramp-up start {start} "
                             f"({diff}) is not a multiple of the increment {increment}")
        # Megatron divides by the number of increments; a ramp from the final size has none.
        self.samples_per_increment = samples / (diff // increment) if diff else math.inf

    @property
    def varies(self) -> bool:
        """True when the batch size changes during training."""
        return self.steps is not None and len(self.steps) > 1 or self.rampup is not None

    def current_global_batch_size(self, consumed_samples: int) -> int:
        """The scheduled global batch for an iteration that starts after `consumed_samples` samples."""
        if self.steps is not None:
            batch = self.steps[0][1]
            for threshold, size in self.steps:
                if consumed_samples < threshold:
                    break
                batch = size
            return batch
        if self.rampup is not None:
            start, increment, samples = self.rampup
            if consumed_samples > samples:
                return self.global_batch_size
            return start + int(consumed_samples / self.samples_per_increment) * increment
        return self.global_batch_size

    def running_global_batch_size(self, consumed_samples: int, check: bool = True) -> int:
        """The batch actually trained: the scheduled one, rounded down to a multiple of micro batch x
        data-parallel size with --decrease-batch-size-if-needed; `check` raises ValueError if it does not
        divide (Megatron's consistency check)."""
        batch = self.current_global_batch_size(consumed_samples)
        if self.decrease_batch_size_if_needed:
            batch = (batch // self.per_micro_batch) * self.per_micro_batch
            if batch == 0 and check:
                raise ValueError(f"--decrease-batch-size-if-needed: the global batch "
                                 f"{self.current_global_batch_size(consumed_samples)} is smaller than micro batch "
                                 f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size}")
        elif check and batch % self.per_micro_batch and not self.varies:
            raise ValueError(f"global batch size ({batch}) is not divisible by micro batch size "
                             f"({self.micro_batch_size}) times data parallel size ({self.data_parallel_size}): "
                             "change --global-batch-size, --micro-batch-size or the parallel sizes")
        elif check and batch % self.per_micro_batch:
            raise ValueError(f"the global batch size {batch} (after {consumed_samples} consumed samples) is not "
                             f"divisible by --micro-batch-size {self.micro_batch_size} x data-parallel size "
                             f"{self.data_parallel_size}; change the batch-size schedule, --micro-batch-size or "
                             "the parallel sizes")
        return batch

    def num_microbatches(self, consumed_samples: int, check: bool = True) -> int:
        """Micro-batches per data-parallel rank for an iteration starting after `consumed_samples`."""
        return self.running_global_batch_size(consumed_samples, check) // self.per_micro_batch

    def final_num_microbatches(self) -> int:
        """Micro-batches of the final (post-ramp) global batch; evaluation uses it, as Megatron evaluates
        with --global-batch-size."""
        batch = self.global_batch_size
        if self.decrease_batch_size_if_needed:
            batch = (batch // self.per_micro_batch) * self.per_micro_batch
        return max(1, batch // self.per_micro_batch)

    def iteration_sizes(self, iterations: int, consumed_samples: int = 0) -> List[int]:
        """The running global batch of each of `iterations` iterations from `consumed_samples` on."""
        sizes = []
        for _ in range(iterations):
            size = self.running_global_batch_size(consumed_samples)
            sizes.append(size)
            consumed_samples += size
        return sizes


def build_batch_schedule(global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                         rampup_batch_size: Optional[Sequence[int]] = None,
                         step_batch_size_schedule: Optional[str] = None, seq_length: Optional[int] = None,
                         decrease_batch_size_if_needed: bool = False) -> BatchSchedule:
    """The schedule the flags describe (constant, --rampup-batch-size or --step-batch-size-schedule)."""
    if rampup_batch_size is not None and step_batch_size_schedule is not None:
        raise ValueError("--rampup-batch-size and --step-batch-size-schedule exclude each other; give one")
    steps = parse_step_schedule(step_batch_size_schedule, seq_length) if step_batch_size_schedule else None
    rampup = None
    if rampup_batch_size is not None:
        if len(rampup_batch_size) != 3:
            raise ValueError(f"--rampup-batch-size takes 3 numbers (start batch size, increment, ramp-up samples), "
                             f"got {list(rampup_batch_size)}")
        rampup = tuple(int(v) for v in rampup_batch_size)
    return BatchSchedule(micro_batch_size, data_parallel_size, global_batch_size, steps, rampup,
                         decrease_batch_size_if_needed)


def train_iters_for_samples(schedule: BatchSchedule, train_samples: int) -> int:
    """Iterations of a sample-based run (--train-samples), as Megatron's update_train_iters counts them."""
    if schedule.steps is not None:
        # 0.19: iterations until the consumed samples reach train_samples
        iterations = consumed = 0
        while consumed < train_samples:
            consumed += schedule.current_global_batch_size(consumed)
            iterations += 1
        return iterations
    if schedule.rampup is not None:
        # 0.15: the ramp-up phase iteration by iteration, then whole constant batches
        ramp_samples = schedule.rampup[2]
        iterations = consumed = 0
        while consumed <= ramp_samples and consumed <= train_samples:
            consumed += schedule.current_global_batch_size(consumed)
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // schedule.global_batch_size
        return iterations
    return train_samples // schedule.global_batch_size
