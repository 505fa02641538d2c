"""Watching a run in one process: Megatron's timers, TensorBoard scalars read back with TensorBoard's reader,
the profiler window, memory lines, the signal handler, the writers' and profiler's settings, and progress."""
import io
import os
import re
import signal
import sys
import time

import numpy as np
import pytest

from mindtron.parallel_core import timers as timers_module
from mindtron.parallel_core.timers import LEVEL_1_TIMERS, LEVEL_2_TIMERS, Timers
from mindtron.progress import Progress
from mindtron.training.config import TrainingConfig
from mindtron.training.profiling import ProfilerWindow, profiler_kwargs
from mindtron.training.signal_handler import DistributedSignalHandler
from mindtron.training.writers import MISSING_TENSORBOARD, build_writers


# -------------------------------------------------------------------------------------------------------
# Timers
# -------------------------------------------------------------------------------------------------------
def test_timers_above_the_level_read_no_clock_and_sync_nothing(monkeypatch):
    def forbidden(*_):
        raise AssertionError("a disabled timer touched the clock or the device")

    monkeypatch.setattr(timers_module, "_synchronize_device", forbidden)
    monkeypatch.setattr(timers_module, "_barrier", forbidden)
    monkeypatch.setattr(timers_module.time, "perf_counter", forbidden)
    timers = Timers(0, "minmax")
    for name in LEVEL_1_TIMERS + LEVEL_2_TIMERS:
        level = 1 if name in LEVEL_1_TIMERS else 2
        timers(name, log_level=level).start(barrier=True)
        timers(name, log_level=level).stop(barrier=True)
        with timers(name, log_level=level, barrier=True):
            pass
    assert timers.names() == [] and timers.log_string(list(LEVEL_1_TIMERS)) is None
    with pytest.raises(RuntimeError, match="above --timing-log-level"):
        timers("optimizer", log_level=1).elapsed()


def test_timer_blocks_have_megatron_s_format():
    timers = Timers(2, "minmax")
    with timers("forward-backward", log_level=1):
        time.sleep(0.02)
    with timers("forward-compute", log_level=2):
        time.sleep(0.01)
    text = timers.log_string(["forward-backward", "all-grads-sync", "forward-compute"], normalizer=2, reset=False)
    lines = text.splitlines()
    assert lines[0] == "(min, max) time across ranks (ms):" and len(lines) == 3  # all-grads-sync never ran
    match = re.fullmatch(r"    forward-backward \.+: \(([0-9.]+), ([0-9.]+)\)", lines[1])
    assert match and len(lines[1].split(":")[0]) == 4 + 48 and 9.0 <= float(match.group(1)) == float(match.group(2))
    timers.log_option = "max"
    assert timers.log_string(["forward-compute"], reset=False).splitlines()[0] == "max time across ranks (ms):"
    timers.log_option = "all"
    assert re.fullmatch(r"times across ranks \(ms\):\n  forward-compute:\n     rank  0: [0-9.]+",
                        timers.log_string(["forward-compute"]))
    assert timers.log_string(["forward-compute"]) is None  # reset by the previous call

    class Writer:
        scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

    timers.write(["forward-backward"], Writer(), 7)
    assert Writer.scalars["forward-backward-time"][1] == 7 and Writer.scalars["forward-backward-time"][0] > 0
    for bad in (lambda: Timers(3), lambda: Timers(1, "median"), lambda: timers("forward-backward", log_level=2)):
        with pytest.raises(ValueError):
            bad()


# -------------------------------------------------------------------------------------------------------
# A training run with everything on
# -------------------------------------------------------------------------------------------------------
def test_one_process_run_writes_tensorboard_timers_memory_and_a_profile_window(tmp_path, capfd, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mindtron.parallel_core.runtime import init_runtime
    from mindtron.training.training import Trainer
    from workers.training_checks import make_config, train

    init_runtime()
    spans = {}
    real_step = Trainer.train_step

    def timed_step(self, data_iterator, *args):  # wall-clock span of each iteration, in ns like the profiler's
        start = time.time_ns()
        result = real_step(self, data_iterator, *args)
        spans[len(spans) + 1] = (start, time.time_ns())
        return result

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    config = make_config(steps=6, log_interval=3, eval_interval=2, eval_iters=1, timing_log_level=2,
                         tensorboard_dir=str(tmp_path / "tb"), log_timers_to_tensorboard=True,
                         log_validation_ppl_to_tensorboard=True, log_memory_to_tensorboard=True, log_memory_interval=3,
                         log_params_norm=True, log_num_zeros_in_grad=True, log_loss_scale_to_tensorboard=False,
                         profile=True, profile_step_start=2, profile_step_end=4, profile_save_path=str(tmp_path / "p"),
                         profile_with_stack=True)
    run = train(config)
    out = capfd.readouterr().out

    # timers: level 1 and level 2 names, once per log interval
    blocks = re.findall(r"\(min, max\) time across ranks \(ms\):\n((?:    .*\n)+)", out)
    assert len(blocks) == 2, out[-3000:]
    names = set(re.findall(r"    (\S+) \.+: \(", "".join(blocks)))
    assert {"forward-backward", "all-grads-sync", "optimizer", "optimizer-copy-to-main-grad",
            "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad", "optimizer-count-zeros",
            "optimizer-inner-step", "batch-generator", "forward-compute", "backward-compute"} <= names, names
    assert re.search(r"\| grad norm: [0-9.]+ \| num zeros: 0 \| params norm: [0-9.]+ \|", out)
    assert len(re.findall(r"\[Rank 0\] \(after [36] iterations\) memory \(MB\) \| host rss: [0-9.]+ \| "
                          r"max host rss: [0-9.]+ \|", out)) == 2

    # TensorBoard, through TensorBoard's own reader
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "loss-scale" not in tags  # --no-log-loss-scale-to-tensorboard
    for tag in ("lm loss", "learning-rate", "grad-norm", "batch-size", "params-norm", "num-zeros"):
        assert {tag, tag + " vs samples"} <= tags, tag
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 7))
        assert [e.step for e in acc.Scalars(tag + " vs samples")] == [8 * i for i in range(1, 7)]
    assert [e.value for e in acc.Scalars("lm loss")] == pytest.approx(run["loss"], rel=1e-6)
    assert {e.value for e in acc.Scalars("batch-size")} == {8.0}
    validation = {e.step: e.value for e in acc.Scalars("lm loss validation")}
    assert validation == pytest.approx(dict(run["eval"]), rel=1e-6) and sorted(validation) == [2, 4, 6]
    ppl = {e.step: e.value for e in acc.Scalars("lm loss validation ppl")}
    assert ppl[2] == pytest.approx(2.718281828 ** validation[2], rel=1e-5)
    for tag in ("iteration-time", "forward-backward-time", "backward-compute-time", "mem-host-rss-bytes"):
        assert [e.step for e in acc.Scalars(tag)] == [3, 6], tag

    # the profiler recorded iterations 3 and 4 and nothing else
    assert f"profiler: recording iterations 3-4 into {tmp_path / 'p' / 'rank_0'}" in out
    assert "--profile-with-stack: Ascend only; accepted and ignored on CPU" in out
    stamps = []
    for path in (tmp_path / "p" / "rank_0").glob("*/FRAMEWORK/cpu_op_execute_timestamp_*.txt"):
        for record in path.read_text().split():
            if record.count(";") == 2:
                stamps += [int(call.split(",")[0]) for call in record.split(";")[2].split()]
            elif "," in record:
                stamps.append(int(record.split(",")[0]))
    assert stamps, "no op timestamps in the profile"
    assert spans[3][0] <= min(stamps) <= spans[3][1] and spans[4][0] <= max(stamps) <= spans[4][1]
    assert list((tmp_path / "p" / "rank_0").glob("*/ASCEND_PROFILER_OUTPUT/trace_view.json"))


# -------------------------------------------------------------------------------------------------------
# Pieces
# -------------------------------------------------------------------------------------------------------
def test_profiler_settings_map_onto_mindspore_s_profiler():
    from mindspore.profiler import AicoreMetrics, ProfilerActivity, ProfilerLevel

    t = TrainingConfig(profile=True, profile_level="level1", profile_aicore_metrics=1, profile_memory=True,
                       profile_framework="all",
                       profile_with_stack=True, profile_l2_cache=True, profile_hbm_ddr=True, profile_pcie=True,
                       profile_parallel_strategy=True, profile_data_process=True, profile_data_simplification=True)
    kw = profiler_kwargs(t, "/out", "Ascend")
    assert kw["profiler_level"] == ProfilerLevel.Level1 and kw["aic_metrics"] == AicoreMetrics.PipeUtilization
    assert kw["activities"] == [ProfilerActivity.CPU, ProfilerActivity.NPU] and kw["start_profile"] is False
    assert all(kw[k] for k in ("profile_memory", "with_stack", "l2_cache", "hbm_ddr", "pcie", "parallel_strategy",
                               "data_process", "data_simplification"))
    level0 = profiler_kwargs(TrainingConfig(profile_communication=True, profile_op_time=False), "/out", "CPU")
    assert level0["profiler_level"] == ProfilerLevel.Level1 and level0["activities"] == [ProfilerActivity.CPU]
    assert profiler_kwargs(TrainingConfig(), "/o", "CPU")["aic_metrics"] == AicoreMetrics.AiCoreNone
    assert profiler_kwargs(TrainingConfig(), "/o", "Ascend")["activities"] == [ProfilerActivity.NPU]
    assert profiler_kwargs(TrainingConfig(profile_op_time=False), "/o", "GPU")["activities"] == [ProfilerActivity.CPU]
    with pytest.raises(ValueError, match="--profile-level"):
        profiler_kwargs(TrainingConfig(profile_level="level9"), "/o", "CPU")
    with pytest.raises(ValueError, match="--profile-aicore-metrics"):
        profiler_kwargs(TrainingConfig(profile_aicore_metrics=42), "/o", "CPU")


def test_profiler_window_runs_on_the_asked_ranks_and_iterations(tmp_path):
    events = []

    class FakeProfiler:
        def __init__(self, **kwargs):
            events.append(("made", kwargs["output_path"]))

        def start(self):
            events.append("start")

        def stop(self):
            events.append("stop")

        def analyse(self):
            events.append("analyse")

    t = TrainingConfig(profile=True, profile_step_start=2, profile_step_end=5, profile_ranks=[1, 3],
                       profile_save_path=str(tmp_path))
    lines = []
    for rank in range(4):
        window = ProfilerWindow(t, rank, printer=lines.append, factory=FakeProfiler)
        for done in range(8):
            window.before_iteration(done)
            window.after_iteration(done + 1)
        assert window.enabled == (rank in (1, 3))
    assert events == [("made", str(tmp_path / "rank_1")), "start", "stop", "analyse",
                      ("made", str(tmp_path / "rank_3")), "start", "stop", "analyse"]
    assert f"profiler: iterations 3-5 written to {tmp_path / 'rank_3'}" in lines
    assert ProfilerWindow(TrainingConfig(profile=True, profile_ranks=[]), 7, factory=FakeProfiler).enabled
    with pytest.raises(ValueError, match="--profile-step-end"):
        ProfilerWindow(TrainingConfig(profile=True, profile_step_start=4, profile_step_end=4), 0)
    events.clear()
    offline = ProfilerWindow(TrainingConfig(profile=True, profile_step_start=0, profile_step_end=1,
                                            profile_offline_analyse=True), 0, printer=lines.append,
                             factory=FakeProfiler)
    offline.before_iteration(0)
    offline.after_iteration(1)
    assert events[-1] == "stop" and "analyse(" in lines[-1]


def test_signal_handler_notes_the_signal_and_restores_the_old_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with DistributedSignalHandler(signal.SIGUSR1) as handler:
        assert not handler.any_rank_received()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert handler.received and handler.any_rank_received()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_exit_on_missing_checkpoint_names_the_directory(tmp_path):
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.training import pretrain
    from workers.training_checks import make_config

    config = make_config(steps=1, load_checkpoint=str(tmp_path / "typo"), exit_on_missing_checkpoint=True)
    try:
        with pytest.raises(FileNotFoundError, match="typo holds no checkpoint.*--exit-on-missing-checkpoint"):
            pretrain(lambda sizes: None, lambda **_: None, all_config=config)
    finally:
        ps.destroy_model_parallel()


def test_writers_are_on_the_last_rank_and_say_what_is_missing(tmp_path, monkeypatch):
    t = TrainingConfig(tensorboard_dir=str(tmp_path / "tb"))
    assert build_writers(t, rank=0, world_size=2) is None
    writer = build_writers(t, rank=1, world_size=2)
    writer.add_scalar("lm loss", 1.5, 3)
    writer.close()
    assert len(list((tmp_path / "tb").iterdir())) == 1
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    with pytest.raises(ImportError) as err:
        build_writers(t, rank=0, world_size=2)
    assert str(err.value) == MISSING_TENSORBOARD and "pip install 'mindtron[monitor]'" in MISSING_TENSORBOARD
    with pytest.raises(ValueError, match="--wandb-exp-name"):
        build_writers(TrainingConfig(wandb_project="p"), rank=0, world_size=1)


# -------------------------------------------------------------------------------------------------------
# Progress
# -------------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_megatron_s_periodic_lines_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(label="Processed", unit="documents", total_bytes=4000, log_interval=2, stream=stream)
    for docs in range(1, 6):
        progress.update(docs, docs * 800)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all("ETA" not in l for l in lines)
    assert re.fullmatch(r"Processed 4 documents \([0-9.]+ docs/s, [0-9.]+ MB/s\)\. 80\.0%", lines[1])
    quarters = io.StringIO()
    files = Progress(8, "writing", stream=quarters, unit="files")
    for i in range(8):
        files.step(f"mp_rank_0{i}", tensors=3)
    assert [l.split(" (")[0] for l in quarters.getvalue().splitlines()] == [
        "writing 2/8 files, 6 tensors", "writing 4/8 files, 12 tensors", "writing 6/8 files, 18 tensors",
        "writing 8/8 files, 24 tensors"]


def test_progress_on_a_terminal_is_a_bar_with_an_eta(monkeypatch):
    pytest.importorskip("tqdm")
    stream = _Terminal()
    progress = Progress(10, "converting", stream=stream, unit="tensors")
    for _ in range(4):
        progress.step()
    progress.close()
    assert re.search(r"converting:\s+\d+%.*4/10.*<", stream.getvalue())  # tqdm: elapsed<remaining
    monkeypatch.setitem(sys.modules, "tqdm", None)  # without tqdm: lines, with an ETA on a terminal
    plain = _Terminal()
    progress = Progress(8, "converting", stream=plain, unit="tensors")
    for _ in range(3):
        progress.step()
    assert "ETA" in plain.getvalue() and "converting 2/8 tensors" in plain.getvalue()


# -------------------------------------------------------------------------------------------------------
# Flags
# -------------------------------------------------------------------------------------------------------
def test_operating_flags_land_in_the_training_config():
    from mindtron.training.arguments import init_configs_from_args, parse_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--train-iters", "10"]
    t = init_configs_from_args(parse_args(args=base + [
        "--exit-signal-handler", "--exit-signal", "SIGUSR1", "--timing-log-level", "2", "--timing-log-option", "all",
        "--no-barrier-with-level-1-timing", "--profile-ranks", "0", "2", "--no-log-loss-scale-to-tensorboard",
        "--log-memory-interval", "200", "--tensorboard-dir", "/tb", "--tensorboard-queue-size", "5",
        "--wandb-project", "p", "--wandb-exp-name", "e", "--exit-on-missing-checkpoint"], world_size=1)).training_config
    assert (t.exit_signal_handler, t.exit_signal, t.timing_log_level, t.timing_log_option) == (True, 10, 2, "all")
    assert (t.barrier_with_L1_time, t.profile_ranks, t.log_loss_scale_to_tensorboard) == (False, [0, 2], False)
    assert (t.log_memory_interval, t.tensorboard_dir, t.tensorboard_queue_size) == (200, "/tb", 5)
    assert (t.wandb_project, t.wandb_exp_name, t.exit_on_missing_checkpoint) == ("p", "e", True)
    assert parse_args(args=base + ["--exit-signal", "15"], world_size=1).exit_signal == 15
    with pytest.raises(ValueError, match="--exit-signal"):
        parse_args(args=base + ["--exit-signal", "SIGNOPE"], world_size=1)


def test_memory_interval_must_be_a_multiple_of_the_log_interval():
    from mindtron.training.config import AllConfig
    from mindtron.training.run_monitor import RunMonitor

    with pytest.raises(ValueError, match="--log-memory-interval \\(15\\) must be a positive multiple of "
                                         "--log-interval \\(10\\)"):
        RunMonitor(AllConfig(training_config=TrainingConfig(log_interval=10, log_memory_interval=15)))


def test_moe_losses_reach_tensorboard_with_megatrons_tags(tmp_path):
    """An MoE run writes each auxiliary loss (mean over MoE layers) and, with --moe-per-layer-logging, one tag
    per layer (moe/<name>_layer_<i>), as Megatron's MoE tracker does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mindtron.parallel_core.runtime import init_runtime
    from workers import moe_checks

    init_runtime()
    run = moe_checks.run(steps=3, moe={"moe_per_layer_logging": True}, tensorboard_dir=str(tmp_path / "tb"),
                         log_interval=1)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "load_balancing_loss", "z_loss", "moe/load_balancing_loss_layer_0",
            "moe/load_balancing_loss_layer_1", "moe/z_loss_layer_1"} <= tags, tags
    written = [e.value for e in acc.Scalars("load_balancing_loss")]
    np.testing.assert_allclose(written, [s["load_balancing_loss"] for s in run["moe_losses"]], rtol=1e-6)
