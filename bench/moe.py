"""MoE training throughput: the experts as a loop (Megatron's SequentialMLP) against the grouped path
(--moe-grouped-gemm), at each expert-parallel size asked for, with the dense model of the same active
parameters (ffn = top-k x expert width) as reference. Variants of one expert-parallel size alternate step by
step in one process, so load on the machine hits them alike; the ratios are printed last.

    python bench/moe.py                                   # one process: EP=1, loop vs grouped vs dense
    python bench/moe.py --tiny --steps 2 --warmup 1       # seconds
    msrun --worker_num 2 --local_worker_num 2 --master_port 8124 --join True \\
        python bench/moe.py --ep 1,2                      # data parallel 2 with EP=1, then EP=2

Model: Mixtral-style (RMSNorm, RoPE, SwiGLU experts), every layer MoE, softmax top-2 over --experts,
aux loss 0.01, fp32, AdamW, clipping at 1.0; synthetic tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MOE_DEFAULTS = dict(vocab=4096, hidden=256, heads=8, layers=2, experts=8, expert_ffn=512, seq=256, micro_batch=4)
MOE_TINY = dict(vocab=256, hidden=64, heads=4, layers=2, experts=8, expert_ffn=64, seq=32, micro_batch=2)


def config_for(args, ep: int, dp: int, grouped: bool, dense: bool, dispatcher: str):
    from mindtron.parallel_core.moe import MoEConfig
    from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig
    from mindtron.legacy_model import TransformerConfig

    moe = MoEConfig() if dense else MoEConfig(
        num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.expert_ffn,
        moe_aux_loss_coeff=0.01, moe_grouped_gemm=grouped, moe_token_dispatcher_type=dispatcher)
    model = TransformerConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads, num_layers=args.layers,
        ffn_hidden_size=args.topk * args.expert_ffn, seq_length=args.seq, normalization="RMSNorm",
        hidden_act="swiglu", position_embedding_type="rope", add_bias_linear=False,
        untie_embeddings_and_output_weights=True, attention_dropout_rate=0.0, hidden_dropout_rate=0.0,
        moe_config=moe)
    steps = args.warmup + args.steps
    return AllConfig(
        model_config=model,
        training_config=TrainingConfig(seed=args.seed, training_iters=steps, micro_batch_size=args.micro_batch,
                                       global_batch_size=args.micro_batch * dp, log_interval=1),
        dataset_config=DatasetConfig(seq_length=args.seq),
        optimizer_config=OptimizerConfig(learning_rate=1e-4, min_lr=1e-4, lr_decay_style="constant",
                                         clip_grad=1.0, weight_decay=0.01),
        parallel_config=ParallelConfig(expert_model_parallel_size=1 if dense else ep))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in MOE_DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({MOE_TINY[name]} with --tiny)")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--ep", default="1", help="comma-separated expert-parallel sizes, run one after another")
    parser.add_argument("--dispatcher", default="alltoall", choices=("allgather", "alltoall"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    for name, value in (MOE_TINY if args.tiny else MOE_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import numpy as np
    from mindspore import Tensor
    from mindtron.parallel_core import comm
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core.runtime import init_runtime

    init_runtime()
    world = comm.get_world_size()
    tokens = args.micro_batch * world * args.seq
    results, rows = {}, []
    for ep in (int(e) for e in args.ep.split(",")):
        variants = {f"EP={ep} loop": (False, False), f"EP={ep} grouped": (True, False)}
        if ep == 1:
            variants["dense, same active parameters"] = (False, True)
        trainers = {}
        for name, (grouped, dense) in variants.items():
            config = config_for(args, ep, world, grouped, dense, args.dispatcher)
            trainers[name] = common.build_mindtron_trainer(config)
        data = common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed + comm.get_rank())
        times = {name: [] for name in trainers}
        for step in range(args.warmup + args.steps):
            for name, trainer in trainers.items():  # alternate: load hits every variant alike
                comm.barrier()
                t = common.timed(trainer.train_step, data)
                if step >= args.warmup:
                    times[name].append(t)
        for name in trainers:
            step_s = float(comm.all_reduce(Tensor(np.array([common.median(times[name])], np.float32)),
                                           op="max").asnumpy()[0])
            results[name] = tokens / step_s
            rows.append((name, step_s * 1000, tokens / step_s))
        ps.destroy_model_parallel()
    if comm.get_rank() == world - 1:
        print(f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} MoE layers of {args.experts} experts "
              f"(ffn {args.expert_ffn}, top-{args.topk}), seq {args.seq}, {world} process(es), "
              f"{tokens} tokens per step, {args.dispatcher} dispatcher")
        print("| variant | step (ms, median) | tokens/s |")
        print("|---|---|---|")
        for name, ms_, tps in rows:
            print(f"| {name} | {ms_:.1f} | {tps:.1f} |")
        for ep in (int(e) for e in args.ep.split(",")):
            print(f"grouped/loop EP={ep}: {results[f'EP={ep} grouped'] / results[f'EP={ep} loop']:.3f}")
    return results


if __name__ == "__main__":
    main()
