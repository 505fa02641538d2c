"""Training throughput of mindtron for one model and parallel layout: tokens/s, model FLOP/s, and that rate
as a fraction of the machine's fp32 matmul rate measured in the same run.

    python bench/throughput.py                                   # single process, the 17M GPT
    python bench/throughput.py --tiny --steps 3                  # seconds
    msrun --worker_num 2 --local_worker_num 2 --master_port 8123 --join True \
        python bench/throughput.py --tp 2                        # any layout: --tp, --pp, --sp; dp is the rest

Model FLOPs per token are mindtron's log-line figure (training/logging.py): 6 x the matmul parameters
(the tied word embedding counted once, as the logits layer) plus attention's 12 x layers x seq x hidden, fwd +
bwd. The matmul rate is measured on every rank at the same time (MindSpore's n x n MatMul and numpy's) and
summed, so the fraction compares the whole job's model FLOP/s with what the same processes can multiply.
Prints a table from the last rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")  # MindSpore's own warnings would bury the figures
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def numpy_matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """numpy's (BLAS) fp32 n x n x n matmul rate in FLOP/s, median of `repeats`."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / common.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser, steps=5, warmup=2)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallel (with --tp > 1)")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="micro-batches per step per data-parallel rank (default 1, pp with --pp)")
    args = common.resolve_sizes(parser.parse_args(argv))

    import numpy as np
    from mindspore import Tensor
    from mindtron.parallel_core import comm
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core.runtime import init_runtime
    from mindtron.training.logging import model_flops_per_token

    init_runtime()
    world = comm.get_world_size()
    if world % (args.tp * args.pp):
        raise ValueError(f"world size {world} is not divisible by --tp {args.tp} x --pp {args.pp}")
    dp = world // (args.tp * args.pp)
    micro_batches = args.micro_batches or args.pp
    config = common.all_config(args, micro_batches=micro_batches, dp=dp, tp=args.tp, pp=args.pp, sp=args.sp)
    trainer = common.build_mindtron_trainer(config)
    data = common.synthetic_text(args.micro_batch, args.seq, args.vocab,
                                 args.seed + ps.get_data_parallel_rank())

    step_s = common.slowest_rank_median_step(trainer, data, args.warmup, args.steps)

    comm.barrier()
    rates = np.array([common.matmul_rate(), numpy_matmul_rate()], np.float32)
    ms_rate, np_rate = comm.all_reduce(Tensor(rates)).asnumpy().tolist()

    tokens = config.training_config.global_batch_size * args.seq
    flops = tokens * model_flops_per_token(config.model_config)
    params = sum(int(p.size) for p in trainer.params)
    params = int(comm.all_reduce(Tensor(np.array([params], np.float32)), ps.get_model_parallel_group()).asnumpy()[0])
    result = {"step_ms": step_s * 1000, "tokens_per_s": tokens / step_s, "model_flops": flops / step_s,
              "matmul_rate_ms": ms_rate, "matmul_rate_numpy": np_rate}
    if comm.get_rank() == world - 1:
        rows = [
            ("model", f"GPT vocab {args.vocab}, hidden {args.hidden}, heads {args.heads}, layers {args.layers}, "
                      f"ffn {args.ffn}, seq {args.seq}, fp32, {params / 1e6:.2f}M parameters"),
            ("layout", f"tp {args.tp}{' + sp' if args.sp else ''}, pp {args.pp}, dp {dp} ({world} processes)"),
            ("jit layers", "on" if getattr(config.model_config, "jit_layers", False) else "off"),
            ("global batch", f"{config.training_config.global_batch_size} sequences = {tokens} tokens "
                             f"(micro batch {args.micro_batch} x {micro_batches} x dp {dp})"),
            ("step time (median)", f"{step_s * 1000:.1f} ms over {args.steps} steps"),
            ("tokens/s", f"{tokens / step_s:.1f}"),
            ("model FLOP/s", f"{flops / step_s / 1e9:.2f} GFLOP/s"),
            ("matmul rate, MindSpore fp32", f"{ms_rate / 1e9:.2f} GFLOP/s"),
            ("matmul rate, numpy fp32", f"{np_rate / 1e9:.2f} GFLOP/s"),
            ("fraction of MindSpore matmul rate", f"{flops / step_s / ms_rate:.3f}"),
            ("fraction of numpy matmul rate", f"{flops / step_s / np_rate:.3f}"),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"| {'quantity'.ljust(width)} | value |")
        print(f"|{'-' * (width + 2)}|-------|")
        for key, value in rows:
            print(f"| {key.ljust(width)} | {value} |")
    return result


if __name__ == "__main__":
    main()
