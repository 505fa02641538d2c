"""Peak activation memory per rank and tokens/s of one long sequence under context parallelism.

    python bench/context_parallel_memory.py                 # seq 2048 at CP = 1, 2, 4 (ring): ~2 min
    python bench/context_parallel_memory.py --tiny          # seconds
    python bench/context_parallel_memory.py --cp-comm-type a2a --cp-sizes 1 2

The driver starts one job per CP size (msrun with CP workers; CP=1 as a plain process) running this
script with --as-cp-worker. Each worker builds a small GPT (fp32), reads its process RSS, runs forward + backward
of one sequence (its load-balanced part of it) and reports the rise of the process's peak RSS over that
step (the activations the backward keeps: attention scores s_q x s_k per head dominate at long sequences),
then times further steps. The table gives the largest rank's figure, its ratio to CP=1 and tokens/s of the
whole sequence; MindSpore keeps no memory statistics on CPU, hence RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "CPMEM "


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor

    from mindtron.legacy_model import GPTModel, TransformerConfig
    from mindtron.parallel_core import comm, parallel_state as ps, tensor_parallel as tp
    from mindtron.parallel_core.context_parallel import get_batch_on_this_cp_rank
    from mindtron.parallel_core.runtime import init_runtime

    init_runtime()
    ps.initialize_model_parallel(context_parallel_size=args.cp)
    tp.model_parallel_seed(1234)
    cfg = TransformerConfig(vocab_size=256, hidden_size=args.hidden, num_attention_heads=args.heads,
                            num_layers=args.layers, ffn_hidden_size=4 * args.hidden, seq_length=args.seq,
                            max_position_embeddings=args.seq, attention_dropout_rate=0.0, hidden_dropout_rate=0.0,
                            position_embedding_type="rope", cp_comm_type=[args.cp_comm_type])
    model = GPTModel(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (1, args.seq)).astype(np.int32)
    local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": np.roll(tokens, -1, 1).astype(np.int32)},
                                      args.seq)
    t, labels = Tensor(local["tokens"]), Tensor(local["labels"])
    params = model.trainable_params()
    step = ms.value_and_grad(lambda x, y: model(x, labels=y), None, params)
    comm.barrier()
    before = _rss()
    loss, _ = step(t, labels)
    loss.asnumpy()
    activation = _peak() - before
    times = []
    for _ in range(args.steps):
        comm.barrier()
        start = time.perf_counter()
        loss, grads = step(t, labels)
        loss.asnumpy()
        comm.barrier()
        times.append(time.perf_counter() - start)
    times.sort()
    print(MARK + json.dumps({"rank": comm.get_rank(), "cp": args.cp, "activation_mb": activation / 2 ** 20,
                             "step_s": times[len(times) // 2], "tokens": args.seq}), flush=True)


def run_size(args, cp: int) -> list:
    flags = ["--as-cp-worker", "--cp", str(cp), "--seq", str(args.seq), "--hidden", str(args.hidden), "--heads",
             str(args.heads), "--layers", str(args.layers), "--steps", str(args.steps),
             "--cp-comm-type", args.cp_comm_type if cp > 1 else "p2p"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3")
    script = str(Path(__file__).resolve())
    if cp == 1:
        out = subprocess.run([sys.executable, script, *flags], env=env, capture_output=True, text=True, cwd=ROOT)
        text = out.stdout + out.stderr
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from multiproc import free_port
        log_dir = tempfile.mkdtemp(prefix="cpmem_")
        msrun = str(Path(sys.executable).parent / "msrun")
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        out = subprocess.run([msrun, "--worker_num", str(cp), "--local_worker_num", str(cp), "--master_port",
                              str(free_port()), "--log_dir", log_dir, "--join=True", script, *flags],
                             env=env, capture_output=True, text=True, cwd=ROOT)
        logs = "".join(p.read_text(errors="replace") for p in sorted(Path(log_dir).glob("worker_*.log")))
        text = logs or out.stdout + out.stderr
    rows = list({r["rank"]: r for r in (json.loads(m) for m in re.findall(MARK + r"(\{[^}]*\})", text))}.values())
    if len(rows) != cp:
        raise SystemExit(f"CP={cp}: {len(rows)} of {cp} ranks reported\n{text[-3000:]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048, 64 with --tiny)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the measured one")
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cp-comm-type", default="p2p", choices=("p2p", "a2a", "allgather", "a2a+p2p"))
    parser.add_argument("--tiny", action="store_true", help="seq 64, CP = 1 and 2 (CI)")
    parser.add_argument("--as-cp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seq is None:
        args.seq = 64 if args.tiny else 2048
    if args.as_cp_worker:
        worker(args)
        return
    if args.tiny:
        args.cp_sizes, args.steps = [1, 2], 1
    print(f"one sequence of {args.seq} tokens, GPT hidden {args.hidden}, {args.heads} heads, {args.layers} layers, "
          f"fp32, --cp-comm-type {args.cp_comm_type}")
    print(f"{'CP':>3} | {'peak activation MB/rank':>23} | {'vs CP=1':>7} | {'tokens/s':>9}")
    base = None
    for cp in args.cp_sizes:
        rows = run_size(args, cp)
        act = max(r["activation_mb"] for r in rows)
        step = max(r["step_s"] for r in rows)
        base = act if base is None else base
        print(f"{cp:>3} | {act:>23.1f} | {act / base:>7.3f} | {args.seq / step:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
