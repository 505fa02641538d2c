"""Pieces shared by the benchmarks: command-line model sizes, building mindtron's trainer the way
`pretrain()` does, synthetic token data, timing, and the machine's measured matmul rate."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Iterator, List

import numpy as np

# The default model: a small GPT-2 style model (17M parameters, 2048 tokens per step).
DEFAULTS = dict(vocab=8192, hidden=512, heads=8, layers=4, ffn=2048, seq=512, micro_batch=4)
# --tiny: the same structure small enough for CI (a few seconds).
TINY = dict(vocab=256, hidden=64, heads=4, layers=2, ffn=256, seq=32, micro_batch=2)


def add_model_args(parser: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    """Model size, step counts and seed flags common to the benchmarks."""
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({TINY[name]} with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CI, smoke tests)")
    parser.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout (default 0)")
    jit = parser.add_mutually_exclusive_group()
    jit.add_argument("--jit-layers", dest="jit_layers", action="store_true", default=None,
                     help="mindtron compiles each transformer layer with mindspore.jit (TransformerConfig.jit_layers)")
    jit.add_argument("--no-jit-layers", dest="jit_layers", action="store_false",
                     help="mindtron runs its transformer layers eagerly (default: TransformerConfig's default)")
    parser.add_argument("--steps", type=int, default=steps, help="measured steps (per variant)")
    parser.add_argument("--warmup", type=int, default=warmup, help="unmeasured steps first (compilation, caches)")
    parser.add_argument("--seed", type=int, default=1234)


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset sizes from DEFAULTS or TINY."""
    base = TINY if args.tiny else DEFAULTS
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def model_config(args, **overrides):
    """mindtron's TransformerConfig for the benchmark model (GPT-2 style, fp32)."""
    from mindtron.legacy_model import TransformerConfig

    return TransformerConfig(**{**dict(
        vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads, num_layers=args.layers,
        ffn_hidden_size=args.ffn, seq_length=args.seq, max_position_embeddings=args.seq,
        attention_dropout_rate=args.dropout, hidden_dropout_rate=args.dropout),
        # only when asked: the bench also runs against older mindtron checkouts (PYTHONPATH) without the field
        # and against checkouts with the other default
        **({} if args.jit_layers is None else {"jit_layers": args.jit_layers}), **overrides})


def all_config(args, micro_batches: int = 1, dp: int = 1, tp: int = 1, pp: int = 1, sp: bool = False,
               lr: float = 1e-4, **training):
    """AllConfig for `args`' model: AdamW, clipping at 1.0 (Megatron's defaults), constant lr."""
    from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig

    steps = args.warmup + args.steps
    return AllConfig(
        model_config=model_config(args, sequence_parallel=sp),
        training_config=TrainingConfig(**{"seed": args.seed, "training_iters": steps,
                                          "micro_batch_size": args.micro_batch,
                                          "global_batch_size": args.micro_batch * micro_batches * dp,
                                          "log_interval": 1, **training}),
        dataset_config=DatasetConfig(seq_length=args.seq),
        optimizer_config=OptimizerConfig(learning_rate=lr, min_lr=lr, lr_decay_style="constant", clip_grad=1.0,
                                         weight_decay=0.01),
        parallel_config=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                       sequence_parallel=sp))


def build_mindtron_trainer(config):
    """What pretrain() builds before its loop: runtime, process groups and seeds, the model, the Trainer."""
    from mindtron.legacy_model import GPTModel
    from mindtron.training.training import Trainer, _ensure_initialized, build_model

    _ensure_initialized(config)

    def model_provider(pre_process=True, post_process=True):
        return GPTModel(config.model_config, pre_process=pre_process, post_process=post_process)

    return Trainer(build_model(model_provider), config)


def synthetic_text(batch: int, seq: int, vocab: int, seed: int) -> Iterator[Dict[str, np.ndarray]]:
    """Endless micro-batches {"text": [b, s + 1] ids}, the items mindtron's data loader yields."""
    rng = np.random.default_rng(seed)
    while True:
        yield {"text": rng.integers(0, vocab, (batch, seq + 1), dtype=np.int64)}


def timed(fn: Callable, *args) -> float:
    """Seconds one call of fn(*args) takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def median(values: List[float]) -> float:
    return statistics.median(values)


def describe_model(args, trainer, config) -> str:
    """The benchmark model's sizes, parameter count and whether mindtron compiles its layers."""
    params = sum(int(p.size) for p in trainer.params)
    jit = "on" if getattr(config.model_config, "jit_layers", False) else "off"
    return (f"model: vocab {args.vocab}, hidden {args.hidden}, heads {args.heads}, layers {args.layers}, "
            f"ffn {args.ffn}, seq {args.seq}, micro batch {args.micro_batch}, fp32, dropout {args.dropout}, "
            f"{params / 1e6:.2f}M parameters; mindtron jit_layers {jit}")


def alternate_steps(sides: Dict[str, Callable[[], float]], warmup: int, steps: int):
    """Run each side's step (returning its loss) `warmup + steps` times, alternating which side goes first so
    neither always runs right after the other's allocations: ({side: measured seconds}, {side: losses})."""
    names = list(sides)
    times: Dict[str, List[float]] = {name: [] for name in names}
    losses: Dict[str, List[float]] = {name: [] for name in names}
    for step in range(warmup + steps):
        for name in (names if step % 2 == 0 else names[::-1]):
            t = timed(lambda: losses[name].append(sides[name]()))
            if step >= warmup:
                times[name].append(t)
    return times, losses


def slowest_rank_median_step(trainer, data, warmup: int, steps: int) -> float:
    """Median seconds of `steps` training steps after `warmup`, the slowest rank's (the job's pace)."""
    from mindspore import Tensor

    from mindtron.parallel_core import comm

    times = []
    for step in range(warmup + steps):
        comm.barrier()
        t = timed(trainer.train_step, data)
        if step >= warmup:
            times.append(t)
    if comm.get_world_size() == 1:
        return median(times)
    return float(comm.all_reduce(Tensor(np.array([median(times)], np.float32)), op="max").asnumpy()[0])


def matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """This process's measured fp32 matmul rate in FLOP/s: median of `repeats` MindSpore n x n x n matmuls."""
    import mindspore as ms
    from mindspore import Tensor, ops

    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((n, n), np.float32))
    b = Tensor(rng.standard_normal((n, n), np.float32))
    matmul = ops.MatMul()
    matmul(a, b).asnumpy()  # first call: kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).asnumpy()
        times.append(time.perf_counter() - start)
    del ms
    return 2.0 * n ** 3 / median(times)
