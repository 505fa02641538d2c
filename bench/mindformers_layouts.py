"""mindtron at MindFormers' GPT benchmark layouts, against MindFormers 1.3.2's PyNative parallel core.

    python bench/mindformers_layouts.py                       # 3 layouts (2 of them through msrun): ~3-5 min
    python bench/mindformers_layouts.py --layouts single pp2  # a subset
    python bench/mindformers_layouts.py --tiny --layouts single   # seconds (CI)
    python bench/mindformers_layouts.py --no-jit-layers       # mindtron's layers eager
    python bench/mindformers_layouts.py --layouts pp2 --stage-recompute   # stages re-run their forward

The model is MindFormers' GPT config (vocab 1024, hidden 256, 8 heads, 4 layers, ffn 1024, seq 256, micro
batch 4; mindtron's GPT-2 style GPTModel, fp32, AdamW, clipping at 1.0) trained through mindtron's Trainer as
pretrain() does, in three layouts: one process; tensor parallel 2 (2 processes); pipeline parallel 2 with 4
micro-batches (2 processes, 1F1B). tokens/s is the job's: the global batch's tokens / the median step time of
its slowest rank. MindFormers is not a dependency, so its side is the figure measured on this machine for
issue 19 (MindFormers' fastest PyNative setting, synchronous, medians of 3): absolute timings move with the
machine's load, so compare on a quiet machine. Prints a table and, last, `min ratio: R` (the project's
target is R >= 2 in every layout).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("GLOG_v", "3")  # MindSpore's own warnings would bury the figures
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

# MindFormers' GPT benchmark config
MINDFORMERS_GPT = dict(vocab=1024, hidden=256, heads=8, layers=4, ffn=1024, seq=256, micro_batch=4)
# layout: (tensor parallel, pipeline parallel, micro-batches, MindFormers 1.3.2 PyNative tokens/s from issue 19)
LAYOUTS = {"single": (1, 1, 1, 914.0), "tp2": (2, 1, 1, 690.0), "pp2": (1, 2, 4, 1528.0)}
TARGET = 2.0
_MARK = "MINDFORMERS_LAYOUT_RESULT "
_WORKER_ENV = "MINDTRON_BENCH_LAYOUT_WORKER"


def worker(args) -> None:
    """One layout on this process (and its msrun peers); the last rank prints the result line."""
    from mindtron.parallel_core import comm
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core.runtime import init_runtime

    tp, pp, micro_batches, _ = LAYOUTS[args.worker]
    if args.stage_recompute:
        from mindtron.parallel_core.pipeline_parallel.schedules import StageRunner
        StageRunner.keep_graph = False
    init_runtime()
    world = comm.get_world_size()
    if world != tp * pp:
        raise ValueError(f"layout {args.worker} needs {tp * pp} processes, got {world}")
    config = common.all_config(args, micro_batches=micro_batches, tp=tp, pp=pp)
    trainer = common.build_mindtron_trainer(config)
    data = common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed + ps.get_data_parallel_rank())
    step_s = common.slowest_rank_median_step(trainer, data, args.warmup, args.steps)
    if comm.get_rank() == world - 1:
        tokens = config.training_config.global_batch_size * args.seq
        print(_MARK + json.dumps({"layout": args.worker, "step_ms": step_s * 1000, "tokens_per_s": tokens / step_s,
                                  "jit_layers": bool(getattr(config.model_config, "jit_layers", False))}),
              flush=True)


def _passthrough(args) -> list:
    """The command-line options a layout's processes get."""
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--dropout", str(args.dropout)]
    for name in MINDFORMERS_GPT:
        out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.jit_layers is not None:
        out.append("--jit-layers" if args.jit_layers else "--no-jit-layers")
    if args.stage_recompute:
        out.append("--stage-recompute")
    return out


def run_layout(name: str, args) -> dict:
    """Run one layout in fresh processes (msrun for 2 ranks) and return its result line."""
    tp, pp, _, _ = LAYOUTS[name]
    nprocs = tp * pp
    cmd = [os.path.abspath(__file__), *_passthrough(args)]
    env = dict(os.environ)
    # the layout goes through the environment: msrun's own parser takes "--worker..." for its --worker_num
    env[_WORKER_ENV] = name
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if nprocs == 1:
        out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
        code = out.returncode
        text = out.stdout + out.stderr
    else:
        import socket
        with socket.socket() as s:  # a free port for msrun's scheduler
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_dir = tempfile.mkdtemp(prefix="mindtron_bench_")
        msrun = shutil.which("msrun", path=env["PATH"]) or "msrun"
        out = subprocess.run([msrun, "--worker_num", str(nprocs), "--local_worker_num", str(nprocs),
                              "--master_port", str(port), "--log_dir", log_dir, "--join=True", *cmd],
                             capture_output=True, text=True, env=env)
        logs = [os.path.join(log_dir, f"worker_{r}.log") for r in range(nprocs)]
        text = out.stdout + out.stderr + "".join(open(p, errors="replace").read() for p in logs if os.path.exists(p))
        code = out.returncode
        shutil.rmtree(log_dir, ignore_errors=True)
    for line in text.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = "\n".join(l for l in text.splitlines() if not l.startswith(("[INFO]", "[WARNING]")))[-4000:]
    raise RuntimeError(f"layout {name} (exit code {code}) printed no result:\n{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser, steps=5, warmup=2)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["single", "tp2", "pp2"],
                        help="which layouts to run (default all three)")
    parser.add_argument("--stage-recompute", action="store_true",
                        help="pipeline stages re-run their forward at backward time instead of keeping the graph "
                             "(the path before issue 19; for comparison)")
    args = parser.parse_args(argv)
    args.worker = os.environ.get(_WORKER_ENV)
    base = common.TINY if args.tiny else MINDFORMERS_GPT
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.worker:
        return worker(args)

    results = [run_layout(name, args) for name in args.layouts]
    print(f"model: vocab {args.vocab}, hidden {args.hidden}, heads {args.heads}, layers {args.layers}, "
          f"ffn {args.ffn}, seq {args.seq}, micro batch {args.micro_batch}, fp32; "
          f"mindtron jit_layers {'on' if results[0]['jit_layers'] else 'off'}")
    print("| layout | processes | micro-batches | mindtron step ms | mindtron tokens/s | MindFormers tokens/s "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for result in results:
        tp, pp, m, reference = LAYOUTS[result["layout"]]
        ratio = result["tokens_per_s"] / reference
        ratios.append(ratio)
        print(f"| {result['layout']} | {tp * pp} | {m} | {result['step_ms']:.1f} | {result['tokens_per_s']:.1f} | "
              f"{reference:.0f} | {ratio:.2f} |")
    print(f"min ratio: {min(ratios):.3f} (target {TARGET:.1f})")
    return min(ratios)


if __name__ == "__main__":
    main()
