"""Where a run's scalars go besides the log: TensorBoard event files and Weights & Biases.

Megatron opens both writers on the last rank of the job only (`rank == world_size - 1`, the rank that holds
the loss), TensorBoard when `--tensorboard-dir` is given and W&B when `--wandb-project` is. mindtron does
the same. TensorBoard files are written with tensorboard's own event writer (the package TensorBoard
itself reads with), so tags keep Megatron's spelling with spaces (`lm loss`, `lm loss vs samples`); the
`--tensorboard-queue-size` events are buffered before a write. W&B follows Megatron's `wandb.init` call
(project, experiment name, directory `--wandb-save-dir` or `<save>/wandb`); set `WANDB_MODE=offline` to log
without a network and upload later with `wandb sync`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

__all__ = ["TensorBoardWriter", "WandbWriter", "build_writers", "get_writer", "set_writer", "MISSING_TENSORBOARD",
           "MISSING_WANDB"]

MISSING_TENSORBOARD = ("--tensorboard-dir needs the 'tensorboard' package, which is not installed: "
                       "pip install 'mindtron[monitor]' (or pip install tensorboard), or drop --tensorboard-dir")
MISSING_WANDB = ("--wandb-project needs the 'wandb' package, which is not installed: "
                 "pip install 'mindtron[monitor]' (or pip install wandb), or drop --wandb-project")


class TensorBoardWriter:
    """Scalars into a TensorBoard event file under `log_dir` (the `add_scalar` interface Megatron uses)."""

    def __init__(self, log_dir: str, max_queue: int = 1000):
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:
            raise ImportError(MISSING_TENSORBOARD) from e
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self._event, self._summary = Event, Summary
        self._file = EventFileWriter(log_dir, max_queue_size=max(1, int(max_queue)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Record `value` under `tag` at `step` (an iteration, or a sample count for `... vs samples`)."""
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=float(value))])
        self._file.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        """Write buffered events to disk."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._file.close()


class WandbWriter:
    """A W&B run; `add_scalar` logs `{tag: value}` at `step`, as Megatron's wandb_writer.log does."""

    def __init__(self, project: str, exp_name: str, save_dir: str, entity: str = "",
                 config: Optional[Dict[str, Any]] = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(MISSING_WANDB) from e
        os.makedirs(save_dir, exist_ok=True)
        kwargs = dict(dir=save_dir, name=exp_name, project=project, config=config or {})
        if entity:
            kwargs["entity"] = entity
        self.run = wandb.init(**kwargs)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Log one value at an iteration (W&B steps must grow, so `... vs samples` tags are not sent here)."""
        if not tag.endswith(" vs samples"):
            self.run.log({tag: float(value)}, step=int(step))

    def flush(self) -> None:
        """W&B writes in the background; nothing to do."""

    def close(self) -> None:
        """Finish the run (offline runs are complete on disk after this)."""
        self.run.finish()


class _Fanout:
    """Several writers behind one `add_scalar`."""

    def __init__(self, writers):
        self.writers = list(writers)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def build_writers(training_config, rank: int, world_size: int, args_record: Optional[dict] = None):
    """This rank's writer (TensorBoard and/or W&B), or None: only the last rank writes, as in Megatron.

    Checks the settings on every rank, so a missing package or experiment name fails the whole job early.
    """
    t = training_config
    if t.wandb_project and not t.wandb_exp_name:
        raise ValueError("--wandb-project needs --wandb-exp-name (the run's name in the project)")
    if t.wandb_project and not (t.wandb_save_dir or t.output_dir):
        raise ValueError("--wandb-project needs --wandb-save-dir or --save (W&B files go to <save>/wandb)")
    writers = []
    if t.tensorboard_dir:
        try:
            import tensorboard.summary.writer.event_file_writer  # noqa: F401 - checked on every rank
        except ImportError as e:
            raise ImportError(MISSING_TENSORBOARD) from e
        if rank == world_size - 1:
            print(f"> setting tensorboard: writing to {t.tensorboard_dir}", flush=True)
            writers.append(TensorBoardWriter(t.tensorboard_dir, t.tensorboard_queue_size))
    if t.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ImportError(MISSING_WANDB) from e
        if rank == world_size - 1:
            save_dir = t.wandb_save_dir or os.path.join(t.output_dir, "wandb")
            writers.append(WandbWriter(t.wandb_project, t.wandb_exp_name, save_dir, t.wandb_entity, args_record))
    if not writers:
        return None
    return writers[0] if len(writers) == 1 else _Fanout(writers)


_WRITER = None


def get_writer():
    """The running job's writer on the rank that writes (None elsewhere, or outside training): code that
    adds its own scalars, such as per-layer MoE losses, calls `get_writer().add_scalar(tag, value, step)`."""
    return _WRITER


def set_writer(writer) -> None:
    """Install the job's writer (RunMonitor does, for the length of train())."""
    global _WRITER
    _WRITER = writer
