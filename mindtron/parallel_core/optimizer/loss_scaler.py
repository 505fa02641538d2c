"""Loss scaling for fp16 training: constant, Megatron's dynamic scaler, and document 000's adaptive scaler.

A training step multiplies the loss by `scaler.scale`, unscales the gradients (`unscale_grads`), asks
`found_inf_in_grads` (agreed over the model-parallel group so every rank skips together), calls
`scaler.update(found_inf)` and steps the optimizer only when no inf/nan was found.

Dynamic scaling (Megatron's DynamicGradScaler): an inf/nan step resets the clean-step count and uses up
one unit of hysteresis; once the hysteresis is used up, each inf/nan step multiplies the scale by
`backoff_factor` (not below `min_scale`). After `growth_interval` clean steps in a row the scale is
multiplied by `growth_factor` and the hysteresis is refilled.

Adaptive scaling (document 000, MindFormers' AdaptiveLossScaleUpdateCell): dynamic scaling (divide by
`scale_factor` on overflow, not below 1; multiply by it after `scale_window` clean steps) whose window
itself moves along a list of windows built from `min_scale_window` to `max_scale_window`, with a special
window 1 below the list:
- every increase of the scale counts in `growth_num` (and clears `down_num`); at three increases the
  window moves one level up the list (from window 1 to the min window) and `growth_num` restarts, until
  the max window;
- every overflow counts in `down_num`; at three overflows without an increase in between, if the window is
  neither the min window nor window 1, it drops to window 1 and both counts restart.
(Document 000 says "当前窗口不为min scale window": the drop to window 1 happens when the window is *not*
the min window, which is also what MindFormers' cell does; a drop at the min window would change nothing.)
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, amp, jit, ops

from mindtron.parallel_core import comm, cpu_kernels
from mindtron.parallel_core.comm import ProcessGroup

__all__ = ["LossScaler", "ConstantLossScaler", "DynamicLossScaler", "AdaptiveLossScaler",
           "AdaptiveLossScaleUpdateCell", "adaptive_scale_windows", "found_inf_in_grads", "unscale_grads"]

logger = logging.getLogger(__name__)


class LossScaler:
    """Common interface: `scale` (float), `inv_scale`, `update(found_inf)`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, scale: float):
        if not scale > 0.0:
            raise ValueError(f"the loss scale must be positive (--loss-scale / --initial-loss-scale), got {scale}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        """The factor the loss is multiplied by this step."""
        return self._scale

    @property
    def inv_scale(self) -> float:
        """1 / scale, rounded to float32 once (the factor gradients are unscaled by)."""
        return float(np.float32(1.0 / self._scale))

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step whose gradients did (True) or did not hold inf/nan."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """JSON-friendly state for checkpoints."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        raise NotImplementedError


class ConstantLossScaler(LossScaler):
    """A fixed loss scale (--loss-scale); inf/nan steps are still skipped by the caller."""

    def update(self, found_inf: bool) -> None:
        """Nothing changes."""

    def state_dict(self) -> Dict[str, Any]:
        """Empty: the scale comes from the arguments, not the checkpoint (as in Megatron)."""
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Nothing to restore."""


class DynamicLossScaler(LossScaler):
    """Megatron's DynamicGradScaler: back off after `hysteresis` overflows, grow after `growth_interval` clean steps."""

    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(f"--min-loss-scale must be positive and at most --initial-loss-scale "
                             f"({initial_scale}), got {min_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be greater than 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be between 0 and 1, got {backoff_factor}")
        if growth_interval <= 0:
            raise ValueError(f"--loss-scale-window must be positive, got {growth_interval}")
        if hysteresis <= 0:
            raise ValueError(f"--hysteresis must be positive, got {hysteresis}")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.growth_tracker = 0                 # clean steps since the last overflow or growth
        self.hysteresis_tracker = self.hysteresis  # overflows left before backing off

    def update(self, found_inf: bool) -> None:
        """Megatron's rule; note the hysteresis is refilled only when the scale grows."""
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self._scale = self._scale * self.growth_factor

    def state_dict(self) -> Dict[str, Any]:
        """Scale and both trackers (Megatron's keys)."""
        return {"scale": self._scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore scale and trackers."""
        self._scale = float(np.asarray(state_dict["scale"]).reshape(-1)[0])
        self.growth_tracker = int(state_dict["growth_tracker"])
        self.hysteresis_tracker = int(state_dict["hysteresis_tracker"])


# --------------------------------------------------------------------------------------------------------
# Adaptive loss scaling (document 000)
# --------------------------------------------------------------------------------------------------------
_THRESHOLD = 3        # increases before the window moves up; overflows before it drops to 1
_WINDOW_INTERVAL = 100  # windows above this are rounded to hundreds when halved (MindFormers' ladder)


def adaptive_scale_windows(max_scale_window: int, min_scale_window: int = 20) -> List[int]:
    """The ladder of scale windows from min to max (window 1 is kept apart, below the ladder).

    Built downwards from the max window as MindFormers does: above 100 halve and round down to hundreds,
    100 goes to 50, below that step down by half the min window; values are kept at or above the min
    window. (1000, 20) gives [20, 30, 40, 50, 100, 200, 500, 1000].
    """
    if not (isinstance(max_scale_window, int) and isinstance(min_scale_window, int)):
        raise ValueError(f"max_scale_window and min_scale_window must be integers, got {max_scale_window!r} "
                         f"and {min_scale_window!r}")
    if min_scale_window <= 0 or max_scale_window <= min_scale_window:
        raise ValueError(f"need 0 < min_scale_window < max_scale_window, got min_scale_window "
                         f"{min_scale_window} and max_scale_window {max_scale_window}")
    ladder = [max_scale_window]
    window = float(max_scale_window)
    while window > min_scale_window:
        if window > _WINDOW_INTERVAL:
            window = int(window / 2 / _WINDOW_INTERVAL) * _WINDOW_INTERVAL
        elif window == _WINDOW_INTERVAL:
            window = window / 2
        else:
            window = window - min_scale_window / 2
        window = max(window, min_scale_window)  # the halving can undershoot (150 -> 0): stop at the min
        if int(window) < ladder[-1]:
            ladder.append(int(window))
    return ladder[::-1]


class AdaptiveLossScaler(LossScaler):
    """Document 000's adaptive loss scaling (MindFormers' AdaptiveLossScaleUpdateCell), see the module doc.

    `scale_window` picks the starting window when it is on the ladder, else the min window is used.
    """

    def __init__(self, loss_scale_value: float, scale_factor: float, scale_window: int,
                 max_scale_window: int = 1000, min_scale_window: int = 20):
        super().__init__(loss_scale_value)
        if not scale_factor > 1.0:
            raise ValueError(f"scale_factor must be greater than 1, got {scale_factor}")
        self.scale_factor = float(scale_factor)
        self.max_scale_window = max_scale_window
        self.min_scale_window = min_scale_window
        self.windows = adaptive_scale_windows(max_scale_window, min_scale_window)
        if scale_window in self.windows:
            self.window_index = self.windows.index(scale_window)
        else:
            logger.warning("scale_window %s is not on the adaptive window ladder %s; starting at the min window "
                           "%s", scale_window, self.windows, min_scale_window)
            self.window_index = 0
        self.min_scale = 1.0
        self.good_steps = 0   # steps since the last overflow or increase
        self.growth_num = 0   # increases since the window last moved
        self.down_num = 0     # overflows since the last increase

    @property
    def scale_window(self) -> int:
        """Clean steps needed before the scale grows (1 for the special window)."""
        return 1 if self.window_index < 0 else self.windows[self.window_index]

    def get_loss_scale(self) -> float:
        """The current loss scale (MindFormers' name)."""
        return self._scale

    def update(self, found_inf: bool) -> None:
        """Apply one step's outcome to the scale, then to the window."""
        self.good_steps += 1
        grow = self.good_steps >= self.scale_window
        if found_inf or grow:
            self.good_steps = 0
        if found_inf:
            self._scale = max(self._scale / self.scale_factor, self.min_scale)
            self.down_num = min(self.down_num + 1, _THRESHOLD)
            if self.down_num == _THRESHOLD and self.window_index > 0:
                self.window_index = -1
                self.growth_num = self.down_num = 0
            return
        if grow:
            self._scale = self._scale * self.scale_factor
            self.down_num = 0
            self.growth_num = min(self.growth_num + 1, _THRESHOLD)
            if self.growth_num == _THRESHOLD and self.window_index < len(self.windows) - 1:
                self.window_index += 1
                self.growth_num = 0

    def state_dict(self) -> Dict[str, Any]:
        """Scale, window position and counters."""
        return {"scale": self._scale, "window_index": self.window_index, "good_steps": self.good_steps,
                "growth_num": self.growth_num, "down_num": self.down_num, "windows": list(self.windows)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the state; the window ladder must be the one this scaler was built with."""
        if list(state_dict.get("windows", self.windows)) != self.windows:
            raise ValueError(f"the checkpoint's adaptive window ladder {state_dict['windows']} differs from this "
                             f"run's {self.windows}: keep max_scale_window / min_scale_window as they were")
        self._scale = float(state_dict["scale"])
        self.window_index = int(state_dict["window_index"])
        self.good_steps = int(state_dict["good_steps"])
        self.growth_num = int(state_dict["growth_num"])
        self.down_num = int(state_dict["down_num"])


AdaptiveLossScaleUpdateCell = AdaptiveLossScaler
"""Document 000's name for the adaptive scaler (same class, same arguments)."""


# --------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------
_map = ops.HyperMap()
_finite = ops.MultitypeFuncGraph("mindtron_finite")


@_finite.register("Tensor")
def _finite_one(g):
    return ops.isfinite(g.reshape(-1)).all()  # 1-D: CPU reductions over a 2-D tensor's axes are slow


@jit
def _all_finite_cpu(grads):
    return ops.stack(_map(_finite, grads)).all()


def _all_finite(grads: Sequence[Tensor]) -> bool:
    """True when every element of every gradient is finite. On CPU: one fused kernel call over all fp32
    gradients (cpu_kernels.GradientStats), else one compiled call (2.5x faster than amp.all_finite there);
    elsewhere amp.all_finite, which knows Ascend's overflow modes."""
    if ms.get_context("device_target") == "CPU":
        stats = cpu_kernels.gradient_stats_for(grads)
        if stats is not None:
            return bool(stats.all_finite(*grads).asnumpy()[0] > 0.5)
        return bool(_all_finite_cpu(ms.mutable(tuple(grads))))
    return bool(amp.all_finite(grads))


def found_inf_in_grads(grads: Sequence[Optional[Tensor]], group: Optional[ProcessGroup] = None) -> bool:
    """True when any gradient on any rank of `group` holds inf/nan (default: the tensor x pipeline group, or
    the whole job when experts are spread over other ranks than dense weights).

    The flag is max-reduced over the group so that all model-parallel ranks skip the same steps.
    """
    from mindtron.parallel_core.optimizer.clip_grads import grad_stats_group

    present = [g for g in grads if g is not None]
    local = bool(present) and not _all_finite(present)
    group = group if group is not None else grad_stats_group()
    if group is None or group.size == 1:
        return local
    flag = comm.all_reduce(Tensor(np.array([1.0 if local else 0.0], np.float32)), group, "max")
    return bool(flag.asnumpy()[0] > 0.0)


def unscale_grads(grads: Sequence[Optional[Tensor]], scale: float) -> List[Optional[Tensor]]:
    """`grads` multiplied by 1/scale (computed in double, applied in float32 as Megatron does)."""
    if not scale > 0.0:
        raise ValueError(f"the loss scale must be positive, got {scale}")
    if scale == 1.0:
        return list(grads)
    inv = Tensor(np.asarray(1.0 / scale, np.float32))
    return [None if g is None else g * inv.astype(g.dtype) for g in grads]
