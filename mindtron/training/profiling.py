"""`--profile`: MindSpore's profiler over a window of iterations on chosen ranks.

With `--profile --profile-step-start S --profile-step-end E --profile-ranks R...`, each rank in R (all ranks
when the list is empty) records the iterations numbered S+1 .. E in the log, as Megatron counts: it starts
once S iterations are done and stops once E are (the defaults, 10 and 12, record iterations 11 and 12).
The output goes to `<profile_save_path>/rank_<r>/` (`--profile-save-path`, default `./profile`) and is
analysed when the window closes, unless `--profile-offline-analyse`; then
`mindspore.profiler.profiler.analyse(dir)` does it later. The result is MindSpore's usual layout
(`*_ascend_ms/ASCEND_PROFILER_OUTPUT/trace_view.json`, a Chrome trace that MindStudio Insight and
chrome://tracing read, plus per-op CSVs under `FRAMEWORK/` on CPU).

Document 002's options map onto MindSpore's profiler:

| config field (flag) | MindSpore profiler | on CPU |
|---|---|---|
| profile_level (`--profile-level level0/1/2`) | `profiler_level=ProfilerLevel.Level0/1/2` | Ascend only |
| profile_with_stack | `with_stack` | Ascend only |
| profile_memory | `profile_memory` | Ascend only |
| profile_framework (`all`/`time`) | host (framework) data: `ProfilerActivity.CPU` in `activities` | always on |
| profile_communication | communication ops: level raised to at least `Level1` | Ascend only |
| profile_parallel_strategy | `parallel_strategy` | Ascend only |
| profile_aicore_metrics (-1 none, 0-7) | `aic_metrics` (see AICORE_METRICS) | Ascend only |
| profile_l2_cache | `l2_cache` | Ascend only |
| profile_hbm_ddr | `hbm_ddr` | Ascend only |
| profile_pcie | `pcie` | Ascend only |
| profile_data_process | `data_process` | not collected |
| profile_data_simplification | `data_simplification` | Ascend only |
| profile_op_time | device op timing: `ProfilerActivity.NPU`/`GPU` in `activities` | host op timing only |
| profile_offline_analyse | no `analyse()` at the end of the window | same |
| profile_dynamic_profiler_config_path | `DynamicProfilerMonitor(cfg_path=...)` stepped every iteration instead | same |

An option that only means something on Ascend is accepted everywhere and, on CPU, said once in the log.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

__all__ = ["ProfilerWindow", "profiler_kwargs", "AICORE_METRICS", "ASCEND_ONLY"]

# --profile-aicore-metrics N -> AicoreMetrics member name (MindSpore's order; -1: none)
AICORE_METRICS = {-1: "AiCoreNone", 0: "ArithmeticUtilization", 1: "PipeUtilization", 2: "Memory", 3: "MemoryL0",
                  4: "ResourceConflictRatio", 5: "MemoryUB", 6: "L2Cache", 7: "MemoryAccess"}
# field -> value at which it does nothing; a different value on CPU is reported as Ascend-only
ASCEND_ONLY = {"profile_level": "level0", "profile_with_stack": False, "profile_memory": False,
               "profile_communication": False, "profile_parallel_strategy": False, "profile_aicore_metrics": 0,
               "profile_l2_cache": False, "profile_hbm_ddr": False, "profile_pcie": False,
               "profile_data_simplification": False}
_LEVELS = {"level0": "Level0", "level1": "Level1", "level2": "Level2"}


def profiler_kwargs(training_config, output_path: str, device_target: str) -> dict:
    """Keyword arguments for `mindspore.Profiler` from the profile_* fields (see the module's table)."""
    from mindspore.profiler import AicoreMetrics, ProfilerActivity, ProfilerLevel

    t = training_config
    if t.profile_level not in _LEVELS:
        raise ValueError(f"--profile-level must be one of {', '.join(_LEVELS)}, got {t.profile_level!r}")
    if t.profile_aicore_metrics not in AICORE_METRICS:
        raise ValueError(f"--profile-aicore-metrics must be one of {sorted(AICORE_METRICS)}, "
                         f"got {t.profile_aicore_metrics}")
    level = _LEVELS[t.profile_level]
    if t.profile_communication and level == "Level0":
        level = "Level1"  # MindSpore collects communication ops from Level1 on
    # host (framework) data with profile_framework; on CPU it is all there is
    activities = [ProfilerActivity.CPU] if t.profile_framework or device_target == "CPU" else []
    if t.profile_op_time and device_target == "Ascend":
        activities.append(ProfilerActivity.NPU)
    elif t.profile_op_time and device_target == "GPU":
        activities.append(ProfilerActivity.GPU)
    activities = activities or [ProfilerActivity.CPU]
    return dict(output_path=output_path, start_profile=False, activities=activities,
                profiler_level=getattr(ProfilerLevel, level),
                # MindSpore collects AI Core metrics from Level1 on (at Level0 it would reset them with a warning)
                aic_metrics=getattr(AicoreMetrics, AICORE_METRICS[t.profile_aicore_metrics] if level != "Level0"
                                    else "AiCoreNone"),
                with_stack=bool(t.profile_with_stack), profile_memory=bool(t.profile_memory),
                parallel_strategy=bool(t.profile_parallel_strategy), l2_cache=bool(t.profile_l2_cache),
                hbm_ddr=bool(t.profile_hbm_ddr), pcie=bool(t.profile_pcie),
                data_process=bool(t.profile_data_process),
                data_simplification=bool(t.profile_data_simplification))


class ProfilerWindow:
    """Starts MindSpore's profiler when `start` iterations are done and stops it when `end` are."""

    def __init__(self, training_config, rank: int, printer: Callable[[str], None] = print,
                 factory: Optional[Callable] = None):
        t = training_config
        self.enabled = bool(t.profile) and rank in _ranks(t.profile_ranks)
        self.start, self.end = int(t.profile_step_start), int(t.profile_step_end)
        if t.profile and self.end <= self.start:
            raise ValueError(f"--profile-step-end ({self.end}) must be after --profile-step-start ({self.start}): "
                             "the window records iterations start+1 .. end")
        self.output_path = os.path.abspath(os.path.join(t.profile_save_path, f"rank_{rank}"))
        self.offline = bool(t.profile_offline_analyse)
        self.dynamic_config = t.profile_dynamic_profiler_config_path or ""
        self._config, self._print, self._factory = t, printer, factory
        self._profiler = None
        self._dynamic = None
        self.recorded: List[int] = []  # iterations inside the window, for the closing message
        if self.enabled:
            self._say_ascend_only()
            if self.dynamic_config:
                from mindspore.profiler import DynamicProfilerMonitor

                self._dynamic = DynamicProfilerMonitor(cfg_path=self.dynamic_config, output_path=self.output_path)
                self._print(f"profiler: dynamic profiling from {self.dynamic_config}, output in {self.output_path}")

    def _say_ascend_only(self) -> None:
        import mindspore as ms

        device = ms.get_context("device_target")
        if device == "Ascend":
            return
        set_here = [name for name, off in ASCEND_ONLY.items() if getattr(self._config, name) != off]
        if set_here:
            flags = ", ".join("--" + n.replace("_", "-") for n in set_here)
            self._print(f"profiler: {flags}: Ascend only; accepted and ignored on {device}")

    def before_iteration(self, completed: int) -> None:
        """Called before each iteration with the number of iterations done so far."""
        if not self.enabled or self._dynamic is not None or completed != self.start:
            return
        import mindspore as ms

        factory = self._factory or ms.Profiler
        self._profiler = factory(**profiler_kwargs(self._config, self.output_path, ms.get_context("device_target")))
        self._profiler.start()
        self._print(f"profiler: recording iterations {self.start + 1}-{self.end} into {self.output_path}")

    def after_iteration(self, iteration: int) -> None:
        """Called after each iteration with its number (the iterations done so far)."""
        if self._dynamic is not None:
            self._dynamic.step()
            return
        if self._profiler is None:
            return
        self.recorded.append(iteration)
        if iteration >= self.end:
            self.close()

    def close(self) -> None:
        """Stop recording (and analyse unless offline); also called when training ends inside the window."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        if self.offline:
            self._print(f"profiler: raw data for iterations {_span(self.recorded)} in {self.output_path}; analyse "
                        f"with: python -c \"from mindspore.profiler.profiler import analyse; "
                        f"analyse('{self.output_path}')\"")
        else:
            profiler.analyse()
            self._print(f"profiler: iterations {_span(self.recorded)} written to {self.output_path}")


class _AllRanks:
    def __contains__(self, rank) -> bool:
        return True


def _ranks(value):
    # Megatron: an empty --profile-ranks list means every rank
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return _AllRanks()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _span(iterations: List[int]) -> str:
    if not iterations:
        return "(none)"
    return f"{iterations[0]}-{iterations[-1]}" if len(iterations) > 1 else str(iterations[0])
