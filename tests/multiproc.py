"""Run a function or a script on N ranks with msrun and collect what each rank returned.

    results = run_on_ranks(4, "tests/workers/foundation_checks.py:main", {"seed": 1})

Each rank calls `main(**kwargs)` after `init_runtime()`; its return value (anything picklable) comes back in
rank order. A launch gets a free port, a time limit and its own log directory; if any rank fails or the
limit passes, the AssertionError shows the failing ranks' logs. A worker that dies on exit after every rank
returned is a RuntimeWarning with the logs, not a failure (see run_on_ranks).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
ENTRY = Path(__file__).resolve().parent / "rank_entry.py"
_NOISE = ("[INFO]", "[WARNING]", "[DEBUG]")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    """Outcome of one msrun launch."""

    returncode: Optional[int]  # None when the time limit killed it
    log_dir: Path
    nprocs: int
    output: str

    def worker_log(self, rank: int, tail: int = 80) -> str:
        """The last `tail` lines of a worker's log, without MindSpore's INFO/WARNING chatter."""
        path = self.log_dir / f"worker_{rank}.log"
        if not path.exists():
            return f"(no log at {path})"
        lines = [l for l in path.read_text(errors="replace").splitlines() if not l.startswith(_NOISE)]
        return "\n".join(lines[-tail:])


def launch(nprocs: int, script: str, args: Sequence[str] = (), timeout: float = 900,
           env: Optional[dict] = None) -> Launch:
    """Start `script args` on `nprocs` ranks with msrun and wait for it (killed after `timeout` s)."""
    log_dir = Path(tempfile.mkdtemp(prefix=f"mindtron_msrun{nprocs}_"))
    bin_dir = str(Path(sys.executable).parent)
    run_env = dict(os.environ)
    # msrun starts workers with the `python` on PATH: make it this interpreter.
    run_env["PATH"] = bin_dir + os.pathsep + run_env.get("PATH", "")
    run_env["PYTHONPATH"] = str(REPO) + os.pathsep + run_env.get("PYTHONPATH", "")
    run_env.setdefault("GLOG_v", "3")
    run_env.setdefault("PYTHONFAULTHANDLER", "1")  # a crashing worker logs its Python stacks
    run_env.update(env or {})
    msrun = str(Path(bin_dir) / "msrun") if (Path(bin_dir) / "msrun").exists() else "msrun"
    cmd = [msrun, "--worker_num", str(nprocs), "--local_worker_num", str(nprocs),
           "--master_port", str(free_port()), "--log_dir", str(log_dir), "--join=True",
           "--cluster_time_out", str(int(timeout)), str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=run_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        returncode = None
    return Launch(returncode, log_dir, nprocs, output)


def _logs(result: Launch, ranks) -> str:
    return "\n".join(f"----- rank {r} ({result.log_dir}/worker_{r}.log) -----\n{result.worker_log(r)}" for r in ranks)


def run_on_ranks(nprocs: int, target: str, kwargs: Optional[dict] = None, timeout: float = 900,
                 env: Optional[dict] = None) -> List[Any]:
    """Call `file.py:function(**kwargs)` on every rank; return the results in rank order."""
    path, _, function = target.partition(":")
    if not function:
        raise ValueError(f"target must be 'path/to/file.py:function', got {target!r}")
    path = str((REPO / path).resolve()) if not os.path.isabs(path) else path
    out_dir = Path(tempfile.mkdtemp(prefix="mindtron_results_"))
    result = launch(nprocs, str(ENTRY), [path, function, str(out_dir), json.dumps(kwargs or {})],
                    timeout=timeout, env=env)
    missing = [r for r in range(nprocs) if not (out_dir / f"rank_{r}.pkl").exists()]
    errors = [r for r in range(nprocs) if (out_dir / f"rank_{r}.error").exists()]
    why = "timed out" if result.returncode is None else f"exited with {result.returncode}"
    if result.returncode not in (0, None) and not missing and not errors:
        # Every rank returned its result; a worker then died while its process shut down. The results are
        # whole, so the checks go on; the exit itself is held to 0 by the launches in
        # test_launch_and_signals.py. The warning keeps the crash visible with every rank's log.
        warnings.warn(f"msrun of {target} on {nprocs} ranks {why} after every rank returned its result (a "
                      f"worker died on exit)\n{_logs(result, range(nprocs))}", RuntimeWarning)
    elif result.returncode != 0 or missing:
        failed = errors or missing or list(range(nprocs))
        raise AssertionError(f"msrun of {target} on {nprocs} ranks {why}; ranks without a result: "
                             f"{missing}\n{_logs(result, failed)}\n----- msrun -----\n{result.output[-3000:]}")
    return [pickle.loads((out_dir / f"rank_{r}.pkl").read_bytes()) for r in range(nprocs)]
