"""Operating a run through examples/gpt/pretrain_gpt.sh, as a user or a cluster scheduler would:

- two "machines" (two launches on 127.0.0.1 with NNODES=2, NODE_RANK 0/1, 2 workers each; the second one's
  msrun is told that 127.0.0.1 is not its own address, as on a real second machine) give the same
  losses as one machine with 4 workers (TP=2 x DP=2, so tensor groups live on a node and data parallelism
  crosses nodes); the one-machine run also carries TensorBoard, W&B (offline), level-1 timers, memory reports
  and a profiler window on ranks 0 and 3, whose outputs are checked here;
- SIGTERM to the launcher's process group mid-run with --exit-signal-handler: every rank finishes its
  iteration, a checkpoint is saved, the job exits 0, and resuming from it gives exactly the losses of an
  uninterrupted run.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from multiproc import REPO, free_port

SCRIPT = REPO / "examples" / "gpt" / "pretrain_gpt.sh"
STEP = re.compile(r"Epoch: 0, Step: (\d+), Loss: ([0-9.]+), Time")
SMALL = ["--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32", "--max-position-embeddings",
         "32", "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "2"]


def _env(log_dir: Path, **extra) -> dict:
    env = dict(os.environ, LOG_DIR=str(log_dir), **{k: str(v) for k, v in extra.items() if v is not None})
    if "PATH" not in extra or extra["PATH"] is None:
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORKERS", None)
    return env


def _second_machine_path(tmp_path: Path) -> str:
    """PATH whose `msrun` behaves as on a second machine. msrun starts the job's scheduler wherever
    --master_addr is a local address; on one machine both launches would, and the second scheduler fails
    on the taken port. On a real second machine the master's address is not local: this msrun says so."""
    bin_dir = tmp_path / "second_machine_bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "msrun").write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from mindspore.parallel.cluster.process_entity import _api\n"
        "_api._is_local_ip = lambda address: False  # the master address is another machine's\n"
        "from mindspore.parallel.cluster.run import main\n"
        "sys.exit(main())\n")
    (bin_dir / "msrun").chmod(0o755)
    return str(bin_dir) + os.pathsep + str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]


def _start(cwd: Path, log_dir: Path, flags, **env) -> subprocess.Popen:
    # its own process group, like a job under a scheduler: killpg reaches the script, not pytest
    return subprocess.Popen(["bash", str(SCRIPT), *SMALL, *map(str, flags)], cwd=cwd, env=_env(log_dir, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def _losses(log: Path) -> dict:
    return {int(s): float(v) for s, v in STEP.findall(log.read_text(errors="replace"))}


def _why(out: str, *logs: Path) -> str:
    tails = [f"----- {p} -----\n" + "\n".join(l for l in p.read_text(errors="replace").splitlines()
                                               if not l.startswith(("[WARNING]", "[INFO]")))[-3000:]
             for p in logs if p.exists()]
    return out[-3000:] + "\n" + "\n".join(tails)


def test_two_nodes_equal_one_node_and_the_run_is_watchable(tmp_path):
    port, two_port = free_port(), free_port()
    layout = ["--tensor-model-parallel-size", "2", "--train-iters", "6"]
    watch = ["--tensorboard-dir", tmp_path / "tb", "--log-timers-to-tensorboard", "--timing-log-level", "1",
             "--timing-log-option", "max", "--log-memory-interval", "2", "--log-memory-to-tensorboard",
             "--log-params-norm", "--log-num-zeros-in-grad", "--log-throughput", "--log-world-size-to-tensorboard",
             "--profile", "--profile-step-start", "2", "--profile-step-end", "4", "--profile-ranks", "0", "3",
             "--profile-save-path", tmp_path / "prof", "--wandb-project", "mindtron-test", "--wandb-exp-name",
             "tiny", "--wandb-save-dir", tmp_path / "wandb"]
    nodes = [_start(tmp_path, tmp_path / f"node{r}", layout, NNODES=2, NODE_RANK=r, WORKERS_PER_NODE=2,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=two_port, PATH=_second_machine_path(tmp_path) if r else None)
             for r in (0, 1)]
    node_out = [_finish(p) for p in nodes]
    one = _start(tmp_path, tmp_path / "one", layout + watch, GPUS_PER_NODE=4, MASTER_PORT=port,
                 WANDB_MODE="offline", WANDB_SILENT="true")
    one_out = _finish(one)
    one_log = tmp_path / "one" / "worker_3.log"
    for r, (p, out) in enumerate(zip(nodes, node_out)):
        assert p.returncode == 0, _why(out, *(tmp_path / f"node{r}").glob("worker_*.log"))
    assert one.returncode == 0, _why(one_out, one_log)

    # the last rank (global rank 3) runs on the second machine and logs there
    two_log = tmp_path / "node1" / "worker_3.log"
    two, single = _losses(two_log), _losses(one_log)
    assert sorted(single) == list(range(1, 7)), _why(one_out, one_log)
    assert two == single  # same layout, same ranks: bit-identical

    text = one_log.read_text(errors="replace")
    # level-1 timers with --timing-log-option max, every log interval; no level-2 names at level 1
    blocks = re.findall(r"max time across ranks \(ms\):\n((?:    .*\n)+)", text)
    assert len(blocks) == 3, text[-3000:]
    names = set(re.findall(r"    (\S+) \.+: [0-9.]+", "".join(blocks)))
    assert {"forward-backward", "all-grads-sync", "optimizer", "optimizer-inner-step",
            "optimizer-clip-main-grad", "optimizer-count-zeros"} <= names, names
    assert not names & {"forward-compute", "backward-compute", "batch-generator"}
    assert re.search(r"\| num zeros: \d+ \| params norm: [0-9.]+ \|", text)
    assert "throughput per GPU (TFLOP/s/GPU):" in text
    # memory: from the first data-parallel rank of each tensor-parallel group (ranks 0 and 1)
    first_dp = (tmp_path / "one" / "worker_1.log").read_text(errors="replace")
    assert re.search(r"\[Rank 1\] \(after 2 iterations\) memory \(MB\) \| host rss: [0-9.]+", first_dp)
    assert "memory (MB)" not in text

    # TensorBoard, written by the last rank only, read with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "loss-scale", "batch-size", "world-size", "params-norm",
                "num-zeros", "iteration-time", "mem-host-rss-bytes", "forward-backward-time", "optimizer-time"):
        assert tag in tags and tag + (" vs samples" if "time" not in tag and "mem" not in tag else "") in tags, tag
    logged = {e.step: e.value for e in acc.Scalars("lm loss")}
    assert sorted(logged) == list(range(1, 7))
    assert all(abs(logged[i] - single[i]) <= 1e-6 * abs(single[i]) for i in logged)
    assert [e.step for e in acc.Scalars("lm loss vs samples")] == [8 * i for i in range(1, 7)]
    assert {e.value for e in acc.Scalars("world-size")} == {4.0}
    assert len(list((tmp_path / "tb").iterdir())) == 1  # one event file: one writing rank

    # W&B offline run on disk
    assert list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))

    # profiler: ranks 0 and 3 only, the window's two iterations, readable MindSpore output
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["rank_0", "rank_3"]
    assert f"profiler: iterations 3-4 written to {tmp_path / 'prof' / 'rank_3'}" in text
    traces = list((tmp_path / "prof" / "rank_3").glob("*/ASCEND_PROFILER_OUTPUT/trace_view.json"))
    ops = list((tmp_path / "prof" / "rank_3").glob("*/FRAMEWORK/cpu_op_type_info_*.csv"))
    assert traces and ops and "MatMul" in ops[0].read_text()


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and max(_losses(log), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never appeared in {log}")


def test_sigterm_mid_run_saves_an_exactly_resumable_checkpoint(tmp_path):
    # Megatron's LR schedule runs over --train-iters: keep it at 200 and stop the shorter runs with
    # --exit-interval, so every run follows the same schedule.
    base = ["--train-iters", "200", "--exit-signal-handler", "--log-interval", "1"]
    ckpt = tmp_path / "ckpt"
    stopped = _start(tmp_path, tmp_path / "stopped", base + ["--save", ckpt, "--save-interval", "1000"],
                     WORKERS=2, MASTER_PORT=free_port())
    reference = _start(tmp_path, tmp_path / "reference", base + ["--exit-interval", "12"], WORKERS=2,
                       MASTER_PORT=free_port())
    stopped_log = tmp_path / "stopped" / "worker_1.log"
    _wait_for_step(stopped_log, 3, stopped)
    os.killpg(stopped.pid, signal.SIGTERM)  # what a scheduler does: the whole job's process group
    out = _finish(stopped)
    ref_out = _finish(reference)
    assert stopped.returncode == 0, _why(out, stopped_log)
    assert reference.returncode == 0, _why(ref_out, tmp_path / "reference" / "worker_1.log")

    reached = max(_losses(stopped_log))
    assert 3 <= reached < 12
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(reached)
    text = stopped_log.read_text(errors="replace")
    assert f"exiting after iteration {reached}: the exit signal was received" in text
    for rank in (0, 1):
        assert "received SIGTERM" in (tmp_path / "stopped" / f"worker_{rank}.log").read_text(errors="replace")

    resumed = _start(tmp_path, tmp_path / "resumed", base + ["--load", ckpt, "--exit-interval", "12"],
                     WORKERS=2, MASTER_PORT=free_port())
    res_out = _finish(resumed)
    resumed_log = tmp_path / "resumed" / "worker_1.log"
    assert resumed.returncode == 0, _why(res_out, resumed_log)
    ref = _losses(tmp_path / "reference" / "worker_1.log")
    first, second = _losses(stopped_log), _losses(resumed_log)
    assert sorted(ref) == list(range(1, 13))
    assert sorted(second) == list(range(reached + 1, 13))
    assert {i: ref[i] for i in first} == first        # the same run up to the signal
    assert {i: ref[i] for i in second} == second      # and exactly the same after resuming


def test_launcher_variables_reach_msrun(tmp_path):
    """The script hands Megatron's launcher variables to msrun (checked with a stand-in msrun on PATH)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "msrun").write_text("#!/usr/bin/env bash\necho \"msrun $*\"\n")
    (fake / "msrun").chmod(0o755)
    env = _env(tmp_path / "logs", NNODES=3, NODE_RANK=2, GPUS_PER_NODE=4, MASTER_ADDR="10.1.2.3", MASTER_PORT=7000)
    env["PATH"] = str(fake) + os.pathsep + env["PATH"]
    run = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(l for l in run.stdout.splitlines() if l.startswith("msrun "))
    assert "--worker_num 12 --local_worker_num 4 --node_rank 2 --master_addr 10.1.2.3 --master_port 7000" in line
