"""Learning-rate and weight-decay schedules with Megatron-Core's `OptimizerParamScheduler` interface.

Steps are whatever unit the caller counts in (Megatron counts samples: `step(increment=global_batch_size)`).

Learning rate at step n (warmup W, decay length D, peak `max_lr`, floor `min_lr`):
- n <= W (W > 0): linear warmup from `init_lr` to `max_lr`;
- "constant": `max_lr` after warmup;
- n > D: `min_lr` (all styles but constant);
- "inverse-square-root": max(min_lr, max_lr * sqrt(max(W, 1) / max(n, 1)));
- otherwise with r = (n - W) / (D - W) and lr = min_lr + c * (max_lr - min_lr):
  "linear" c = 1 - r, "cosine" c = (1 + cos(pi r)) / 2,
  "WSD" (warmup-stable-decay) c = 1 until the last `wsd_decay_steps` of D, then with
  q = (n - (D - wsd_decay_steps)) / wsd_decay_steps: "linear" 1 - q, "cosine" (1 + cos(pi q)) / 2,
  "exponential" 2 * 0.5^q - 1, "minus_sqrt" 1 - sqrt(q).

Weight decay at step n (increment length I): `end_wd` once n > I, else start_wd + c * (end_wd - start_wd)
with t = n / I and "linear" c = t, "cosine" c = (1 - cos(pi t)) / 2; "constant" needs start_wd == end_wd.

Each optimizer param group may override `max_lr`, `min_lr`, `start_wd`, `end_wd`; its lr is multiplied by
`lr_mult` and its weight decay by `wd_mult` (0 for biases and norm weights).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

__all__ = ["OptimizerParamScheduler", "LR_DECAY_STYLES", "WSD_DECAY_STYLES", "WD_INCR_STYLES"]

logger = logging.getLogger(__name__)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")

# Older Megatron checkpoints used other names for some entries: new name -> accepted old names.
_LEGACY_KEYS = {
    "max_lr": ("start_lr",),
    "lr_warmup_steps": ("warmup_iter", "warmup_steps"),
    "lr_decay_steps": ("end_iter", "decay_steps"),
    "lr_decay_style": ("decay_style",),
    "num_steps": ("num_iters",),
}


def _anneal(style: str, ratio: float) -> float:
    """Coefficient falling from 1 at ratio 0 to 0 at ratio 1 in the given shape."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * ratio))
    if style == "exponential":
        return 2.0 * 0.5 ** ratio - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(f"unknown decay shape {style!r}")


class OptimizerParamScheduler:
    """Sets each optimizer param group's `lr` and `weight_decay` from the step count (Megatron-Core's class).

    The values go into `optimizer.param_groups` on every `step()`, so the next optimizer step uses them.
    `use_checkpoint_opt_param_scheduler` takes the schedule's settings from a loaded state dict;
    `override_opt_param_scheduler` keeps the constructor's; with neither, they must agree.
    """

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float, lr_warmup_steps: int,
                 lr_decay_steps: int, lr_decay_style: str, start_wd: float, end_wd: float, wd_incr_steps: int,
                 wd_incr_style: str, use_checkpoint_opt_param_scheduler: bool = True,
                 override_opt_param_scheduler: bool = False, wsd_decay_steps: Optional[int] = None,
                 lr_wsd_decay_style: Optional[str] = None) -> None:
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.lr_decay_steps = int(lr_decay_steps)
        self.lr_decay_style = lr_decay_style
        # Megatron's --lr-wsd-decay-style defaults to exponential.
        self.lr_wsd_decay_style = lr_wsd_decay_style or "exponential"
        self.wsd_decay_steps = None if wsd_decay_steps is None else int(wsd_decay_steps)
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps)
        self.wd_incr_style = wd_incr_style
        self.use_checkpoint_opt_param_scheduler = bool(use_checkpoint_opt_param_scheduler)
        self.override_opt_param_scheduler = bool(override_opt_param_scheduler)
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler cannot both "
                             "be set: the first keeps the arguments' schedule, the second the checkpoint's")
        self._validate()
        self.num_steps = 0
        self.step(0)

    # ----------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.min_lr < 0.0:
            raise ValueError(f"--min-lr must be >= 0, got {self.min_lr}")
        if self.max_lr < self.min_lr:
            raise ValueError(f"--lr ({self.max_lr}) must be >= --min-lr ({self.min_lr})")
        if self.init_lr > self.max_lr:
            raise ValueError(f"--lr-warmup-init ({self.init_lr}) must be <= --lr ({self.max_lr})")
        if self.lr_decay_steps <= 0:
            raise ValueError(f"the learning-rate decay length must be positive (--lr-decay-iters / "
                             f"--lr-decay-samples / --train-iters), got {self.lr_decay_steps}")
        if not 0 <= self.lr_warmup_steps < self.lr_decay_steps:
            raise ValueError(f"the warmup length ({self.lr_warmup_steps}, --lr-warmup-iters / --lr-warmup-samples / "
                             f"--lr-warmup-fraction) must be >= 0 and less than the decay length "
                             f"({self.lr_decay_steps}, --lr-decay-iters / --lr-decay-samples)")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.lr_decay_style == "WSD":
            if self.wsd_decay_steps is None:
                raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")
            if not 0 < self.wsd_decay_steps <= self.lr_decay_steps:
                raise ValueError(f"--lr-wsd-decay-iters/-samples ({self.wsd_decay_steps}) must be positive and at "
                                 f"most the decay length ({self.lr_decay_steps})")
            if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"--lr-wsd-decay-style must be one of {WSD_DECAY_STYLES}, "
                                 f"got {self.lr_wsd_decay_style!r}")
        if self.start_wd < 0.0:
            raise ValueError(f"--start-weight-decay must be >= 0, got {self.start_wd}")
        if self.end_wd < self.start_wd:
            raise ValueError(f"--end-weight-decay ({self.end_wd}) must be >= --start-weight-decay ({self.start_wd})")
        if self.wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(f"--weight-decay-incr-style must be one of {WD_INCR_STYLES}, got {self.wd_incr_style!r}")
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ValueError(f"--weight-decay-incr-style constant needs --start-weight-decay ({self.start_wd}) equal "
                             f"to --end-weight-decay ({self.end_wd}); choose linear or cosine to change it")
        if self.wd_incr_style != "constant" and self.wd_incr_steps <= 0:
            raise ValueError(f"--weight-decay-incr-style {self.wd_incr_style} needs a positive increment length "
                             f"(--train-iters / --train-samples), got {self.wd_incr_steps}")

    # ----------------------------------------------------------------------------------------------------
    def get_wd(self, param_group: Optional[dict] = None) -> float:
        """Weight decay at the current step (before the group's `wd_mult`)."""
        group = param_group or {}
        start_wd = group.get("start_wd", self.start_wd)
        end_wd = group.get("end_wd", self.end_wd)
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps:
            return end_wd
        ratio = float(self.num_steps) / float(self.wd_incr_steps)
        coeff = ratio if self.wd_incr_style == "linear" else 0.5 * (1.0 - math.cos(math.pi * ratio))
        return start_wd + coeff * (end_wd - start_wd)

    def get_lr(self, param_group: Optional[dict] = None) -> float:
        """Learning rate at the current step (before the group's `lr_mult`)."""
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        n = self.num_steps
        warmup = self.lr_warmup_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (max_lr - self.init_lr) * float(n) / float(warmup)
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
        if self.lr_decay_style == "WSD":
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            coeff = 1.0 if n <= anneal_start else _anneal(
                self.lr_wsd_decay_style, float(n - anneal_start) / float(self.wsd_decay_steps))
        else:
            ratio = float(n - warmup) / float(self.lr_decay_steps - warmup)
            coeff = _anneal(self.lr_decay_style, ratio)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int = 1) -> None:
        """Advance by `increment` steps and write lr / weight decay into every optimizer param group."""
        self.num_steps += int(increment)
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    # ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The schedule's settings and position (plain numbers and strings: JSON friendly)."""
        return {
            "max_lr": self.max_lr, "min_lr": self.min_lr, "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps, "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps, "start_wd": self.start_wd, "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style, "wd_incr_steps": self.wd_incr_steps,
            "wsd_decay_steps": self.wsd_decay_steps, "lr_wsd_decay_style": self.lr_wsd_decay_style,
        }

    def _pick(self, current, saved, what: str):
        """The value to run with for one setting, by the override / use-checkpoint rules."""
        if self.override_opt_param_scheduler:
            return current
        if not self.use_checkpoint_opt_param_scheduler and current != saved:
            raise ValueError(f"OptimizerParamScheduler: {what} is {current} in the arguments but {saved} in the "
                             "checkpoint; pass --override-opt_param-scheduler to keep the arguments or "
                             "--use-checkpoint-opt_param-scheduler to take the checkpoint's")
        if current != saved:
            logger.info("using the checkpoint's %s: %s", what, saved)
        return saved

    @staticmethod
    def _saved(state_dict: Dict[str, Any], key: str):
        for name in (key,) + _LEGACY_KEYS.get(key, ()):
            if name in state_dict:
                return state_dict[name]
        raise ValueError(f"scheduler state has no {key!r} entry; it is not an OptimizerParamScheduler state")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the step count and, by the override / use-checkpoint rules, the schedule's settings.

        The step count is set (not added to the current one) and the optimizer groups are updated at once.
        """
        lr_settings = (("max_lr", "learning rate (--lr)"), ("min_lr", "minimum learning rate (--min-lr)"),
                       ("lr_warmup_steps", "warmup length (--lr-warmup-iters)"),
                       ("lr_decay_steps", "decay length (--lr-decay-iters)"),
                       ("lr_decay_style", "learning rate decay style (--lr-decay-style)"))
        chosen = {key: self._pick(getattr(self, key), self._saved(state_dict, key), what)
                  for key, what in lr_settings}
        if "start_wd" in state_dict:
            for key, what in (("start_wd", "start weight decay (--start-weight-decay)"),
                              ("end_wd", "end weight decay (--end-weight-decay)"),
                              ("wd_incr_steps", "weight decay increment length"),
                              ("wd_incr_style", "weight decay increment style (--weight-decay-incr-style)")):
                chosen[key] = self._pick(getattr(self, key), state_dict[key], what)
        # WSD settings are mindtron additions (Megatron does not save them): checked only when present.
        for key, what in (("wsd_decay_steps", "WSD decay length (--lr-wsd-decay-iters)"),
                          ("lr_wsd_decay_style", "WSD decay style (--lr-wsd-decay-style)")):
            if state_dict.get(key) is not None:
                chosen[key] = self._pick(getattr(self, key), state_dict[key], what)
        num_steps = int(self._saved(state_dict, "num_steps"))
        for key, value in chosen.items():
            setattr(self, key, value)
        self._validate()
        self.num_steps = num_steps
        self.step(0)
