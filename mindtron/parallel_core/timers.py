"""Megatron's named timers: `--timing-log-level 0|1|2` and `--timing-log-option max|minmax|all`.

    timers = get_timers()
    with timers("forward-backward", log_level=1, barrier=True):
        ...
    timers.log(names, normalizer=log_interval)       # every rank calls it; the last rank prints

A timer whose level is above the configured `--timing-log-level` is a shared no-op object: it reads no
clock, synchronises no device and waits for no rank, so level 0 (the default) adds no host
synchronisation to a step. A real timer synchronises the device before reading the clock (as Megatron's
`torch.cuda.synchronize()`), so its time is that of the finished work, and with `barrier=True` waits for
every rank first.

Printing follows Megatron's `Timers.log`: the times (ms, divided by `normalizer`) are gathered from every
rank and the last rank prints `(min, max) time across ranks (ms):` with one dotted line per timer, or
`max time across ranks (ms):`, or `times across ranks (ms):` with a line per rank. Timers nobody ran are
left out. `write(names, writer, iteration)` puts each timer's maximum under `<name>-time` in TensorBoard.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["Timer", "Timers", "get_timers", "set_timers", "LEVEL_1_TIMERS", "LEVEL_2_TIMERS"]

# The names Megatron's training_log prints at each level (only those that ran appear in a line).
LEVEL_1_TIMERS = (
    "forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce", "all-grads-sync",
    "params-all-gather", "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
    "optimizer-copy-main-to-model-params", "optimizer",
)
LEVEL_2_TIMERS = (
    "batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send", "backward-recv",
    "backward-send", "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
    "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
)
_MAX_LEVEL = 2
_LOG_OPTIONS = ("max", "minmax", "all")


_DEVICE_SYNC = None


def _synchronize_device() -> None:
    # Devices run kernels asynchronously: wait for them. CPU runs with pynative_synchronize (see
    # runtime.init_runtime), so its ops have finished already (and ms.runtime.synchronize refuses CPU).
    global _DEVICE_SYNC
    if _DEVICE_SYNC is None:
        import mindspore as ms

        _DEVICE_SYNC = ms.runtime.synchronize if ms.get_context("device_target") != "CPU" else (lambda: None)
    _DEVICE_SYNC()


def _barrier() -> None:
    from mindtron.parallel_core import comm

    comm.barrier()


class _NoTimer:
    """What a timer above the configured level is: every call does nothing."""

    name = "dummy timer"

    def start(self, barrier: bool = False) -> None:
        """Nothing."""

    def stop(self, barrier: bool = False) -> None:
        """Nothing."""

    def reset(self) -> None:
        """Nothing."""

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """A disabled timer has no time: asking for it is a programming error."""
        raise RuntimeError("a timer above --timing-log-level has no elapsed time")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class Timer:
    """One named timer that accumulates the time between start() and stop() calls."""

    def __init__(self, name: str):
        self.name = name
        self._elapsed = 0.0
        self._active_time = 0.0
        self._started = False
        self._start_time = 0.0
        self._barrier_on_enter = False

    def start(self, barrier: bool = False) -> None:
        """Begin timing (after every rank arrives when `barrier`); the device is synchronised first."""
        if self._started:
            raise RuntimeError(f"timer {self.name!r} has already been started")
        if barrier:
            _barrier()
        _synchronize_device()
        self._start_time = time.perf_counter()
        self._started = True

    def stop(self, barrier: bool = False) -> None:
        """End timing and add the interval to the accumulated time."""
        if not self._started:
            raise RuntimeError(f"timer {self.name!r} is not started")
        if barrier:
            _barrier()
        _synchronize_device()
        interval = time.perf_counter() - self._start_time
        self._elapsed += interval
        self._active_time += interval
        self._started = False

    def reset(self) -> None:
        """Forget the accumulated time (the lifetime active time stays)."""
        self._elapsed = 0.0
        self._started = False

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Accumulated seconds (a running timer is stopped and restarted around the read)."""
        running = self._started
        if running:
            self.stop(barrier=barrier)
        value = self._elapsed
        if reset:
            self.reset()
        if running:
            self.start(barrier=barrier)
        return value

    def active_time(self) -> float:
        """Seconds this timer has run over its whole life."""
        return self._active_time

    def __call__(self, barrier: bool = False) -> "Timer":
        """`with timer(barrier=True):` waits for every rank before it starts."""
        self._barrier_on_enter = barrier
        return self

    def __enter__(self) -> "Timer":
        self.start(barrier=self._barrier_on_enter)
        self._barrier_on_enter = False
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self.stop()


class Timers:
    """The job's timers: `timers(name, log_level)` returns a running-capable Timer or a no-op."""

    def __init__(self, log_level: int = 0, log_option: str = "minmax"):
        if log_level not in range(_MAX_LEVEL + 1):
            raise ValueError(f"--timing-log-level must be 0, 1 or 2, got {log_level}")
        if log_option not in _LOG_OPTIONS:
            raise ValueError(f"--timing-log-option must be one of {', '.join(_LOG_OPTIONS)}, got {log_option!r}")
        self.log_level, self.log_option = log_level, log_option
        self._timers: Dict[str, Timer] = {}
        self._levels: Dict[str, int] = {}
        self._none = _NoTimer()

    def __call__(self, name: str, log_level: Optional[int] = None, barrier: bool = False):
        """The timer `name` (created at `log_level`, default 2), or a no-op above the configured level.

        `barrier` only matters when the result is used as a context manager.
        """
        if name in self._timers:
            if log_level is not None and log_level != self._levels[name]:
                raise ValueError(f"timer {name!r} was created at level {self._levels[name]}, not {log_level}")
            return self._timers[name](barrier)
        level = _MAX_LEVEL if log_level is None else log_level
        if level > _MAX_LEVEL:
            raise ValueError(f"timer level {level} is above the largest, {_MAX_LEVEL}")
        if level > self.log_level:
            return self._none
        self._timers[name] = Timer(name)
        self._levels[name] = level
        return self._timers[name](barrier)

    def names(self) -> List[str]:
        """Timers created so far, in creation order."""
        return list(self._timers)

    def _times_all_ranks(self, names: Sequence[str], reset: bool, barrier: bool) -> np.ndarray:
        """[world, len(names)] seconds: this rank's row filled, then summed over ranks (an all-gather)."""
        from mindspore import Tensor
        from mindtron.parallel_core import comm

        if barrier:
            _barrier()
        world, rank = comm.get_world_size(), comm.get_rank()
        table = np.zeros((world, len(names)), np.float32)
        for i, name in enumerate(names):
            if name in self._timers:
                table[rank, i] = self._timers[name].elapsed(reset=reset)
        if world > 1:
            table = comm.all_reduce(Tensor(table)).asnumpy()
        return table

    def min_max(self, names: Sequence[str], normalizer: float = 1.0, reset: bool = True,
                barrier: bool = False) -> Dict[str, tuple]:
        """{name: (min, max) ms over the ranks that ran it}, for the timers some rank ran."""
        if normalizer <= 0:
            raise ValueError("the timer normalizer must be positive")
        names = list(names)
        if not names:
            return {}
        table = self._times_all_ranks(names, reset, barrier) * 1000.0 / normalizer
        out = {}
        for i, name in enumerate(names):
            ran = [float(v) for v in table[:, i] if v > 0.0]
            if ran:
                out[name] = (min(ran), max(ran))
        return out

    def log_string(self, names: Sequence[str], normalizer: float = 1.0, reset: bool = True,
                   barrier: bool = False) -> Optional[str]:
        """Megatron's timer block for `names` (None when none ran). Every rank must call it."""
        names = list(names)
        if not names:
            return None
        if self.log_option == "all":
            if normalizer <= 0:
                raise ValueError("the timer normalizer must be positive")
            table = self._times_all_ranks(names, reset, barrier) * 1000.0 / normalizer
            lines = []
            for i, name in enumerate(names):
                ranks = [(r, float(v)) for r, v in enumerate(table[:, i]) if v > 0.0]
                if ranks:
                    lines.append(f"  {name}:")
                    lines += [f"     rank {r:2d}: {v:.2f}" for r, v in ranks]
            return "times across ranks (ms):\n" + "\n".join(lines) if lines else None
        times = self.min_max(names, normalizer, reset, barrier)
        if not times:
            return None
        if self.log_option == "max":
            body = [f"    {(name + ' ').ljust(48, '.')}: {hi:.2f}" for name, (_, hi) in times.items()]
            return "max time across ranks (ms):\n" + "\n".join(body)
        body = [f"    {(name + ' ').ljust(48, '.')}: ({lo:.2f}, {hi:.2f})" for name, (lo, hi) in times.items()]
        return "(min, max) time across ranks (ms):\n" + "\n".join(body)

    def log(self, names: Sequence[str], normalizer: float = 1.0, reset: bool = True, barrier: bool = False,
            rank: Optional[int] = None) -> Optional[str]:
        """Print the block on `rank` (default: the last rank); every rank must call it. Returns the text."""
        from mindtron.parallel_core import comm

        text = self.log_string(names, normalizer, reset, barrier)
        printer = comm.get_world_size() - 1 if rank is None else rank
        if text is not None and comm.get_rank() == printer:
            print(text, flush=True)
        return text

    def write(self, names: Sequence[str], writer, iteration: int, normalizer: float = 1.0, reset: bool = True,
              barrier: bool = False) -> None:
        """Each timer's maximum over ranks as the scalar `<name>-time` (every rank must call it)."""
        times = self.min_max(names, normalizer, reset, barrier)
        if writer is not None:
            for name, (_, hi) in times.items():
                writer.add_scalar(name + "-time", hi, iteration)


_TIMERS = Timers(0, "minmax")


def get_timers() -> Timers:
    """The job's timers (level 0 until `set_timers`: every level-1/2 timer is a no-op)."""
    return _TIMERS


def set_timers(timers: Timers) -> Timers:
    """Install the job's timers (pretrain() does this from --timing-log-level/--timing-log-option)."""
    global _TIMERS
    _TIMERS = timers
    return timers
