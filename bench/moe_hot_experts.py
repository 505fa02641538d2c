"""All-to-all traffic and throughput of MoE training with and without hot experts (documents 000 and 004), on a
router biased towards a few experts (Megatron's --moe-router-force-biased: random logits plus a fixed random
per-expert bias, so a few experts get most tokens).

    msrun --worker_num 2 --local_worker_num 2 --master_port 8125 --join True python bench/moe_hot_experts.py
    msrun --worker_num 4 --local_worker_num 4 --master_port 8126 --join True python bench/moe_hot_experts.py
    python bench/moe_hot_experts.py --tiny --steps 1     # one process (EP=1, nothing to send): a smoke test

Expert parallel = the number of processes (data parallel the same). Two trainers of the same model, seed,
data and random router logits (so they route alike) alternate step by step: all experts dispatched by the
all-to-all, and `--hot-experts` hot experts per layer
(chosen after the warm-up step from the routed counts, as the ColdHotExpertMonitor would). Printed per
variant: bytes the job's all-to-alls sent per step (summed over ranks, counting what a native all-to-all
sends: rows for other ranks, dispatch and combine, forward and backward), bytes of the hot experts' weight
and gradient exchange, median step time and tokens/s; then the hot experts' share of the routed pairs and
the all-to-all ratio hot / plain, whose target is at most 1 - that share (the share: the hot experts' part
of the pairs the plain variant computed, i.e. of its all-to-all rows, in expectation). With the default cold
token percent 1 and no capacity limit both variants train the same model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULTS = dict(vocab=4096, hidden=256, heads=8, layers=2, experts=8, expert_ffn=256, seq=256, micro_batch=4)
TINY = dict(vocab=256, hidden=64, heads=4, layers=2, experts=8, expert_ffn=64, seq=32, micro_batch=2)


def config_for(args, ep: int, hot: bool):
    from mindtron.legacy_model import TransformerConfig
    from mindtron.parallel_core.moe import MoEConfig
    from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig

    moe = MoEConfig(num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.expert_ffn,
                    moe_aux_loss_coeff=0.01, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True,
                    moe_router_force_biased=-abs(args.bias_std), moe_expert_capacity_factor=args.capacity_factor,
                    enable_cold_hot_expert=hot, hot_expert_num=args.hot_experts if hot else 0,
                    cold_token_percent=args.cold_token_percent if hot else 1.0)
    model = TransformerConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads, num_layers=args.layers,
        ffn_hidden_size=args.topk * args.expert_ffn, seq_length=args.seq, normalization="RMSNorm",
        hidden_act="swiglu", position_embedding_type="rope", add_bias_linear=False,
        untie_embeddings_and_output_weights=True, attention_dropout_rate=0.0, hidden_dropout_rate=0.0,
        moe_config=moe)
    return AllConfig(
        model_config=model,
        training_config=TrainingConfig(seed=args.seed, training_iters=args.warmup + args.steps,
                                       micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch * ep,
                                       log_interval=1),
        dataset_config=DatasetConfig(seq_length=args.seq),
        optimizer_config=OptimizerConfig(learning_rate=1e-4, min_lr=1e-4, lr_decay_style="constant",
                                         clip_grad=1.0, weight_decay=0.01),
        parallel_config=ParallelConfig(expert_model_parallel_size=ep))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({TINY[name]} with --tiny)")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--hot-experts", type=int, default=2, help="hot experts per layer (default 2)")
    parser.add_argument("--bias-std", type=float, default=2.0,
                        help="std of the router's fixed per-expert bias (--moe-router-force-biased -STD)")
    parser.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    parser.add_argument("--cold-token-percent", type=float, default=1.0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the hot experts are chosen from the warm-up step)")
    for name, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import numpy as np
    from mindspore import Tensor
    from mindtron.parallel_core import comm
    from mindtron.parallel_core import tensor_parallel as tp
    from mindtron.parallel_core.moe import MoELayer
    from mindtron.parallel_core.moe.hot_experts import choose_hot_experts
    from mindtron.parallel_core.runtime import init_runtime

    init_runtime()
    world = comm.get_world_size()
    tokens = args.micro_batch * world * args.seq

    def total(value: float) -> float:  # summed over ranks
        return float(comm.all_reduce(Tensor(np.array([value], np.float32))).asnumpy()[0])

    trainers = {name: common.build_mindtron_trainer(config_for(args, world, hot))
                for name, hot in (("plain", False), ("hot", True))}
    data = {name: common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed + comm.get_rank())
            for name in trainers}
    layers = [c for m in trainers["hot"].chunks for _, c in m.cells_and_names() if isinstance(c, MoELayer)]
    times = {name: [] for name in trainers}
    sent = {name: {"all_to_all": [], "hot_expert_sync": []} for name in trainers}
    hot_pairs = all_pairs = 0
    rng = tp.get_rng_tracker()
    for step in range(args.warmup + args.steps):
        draws = rng.get_states()
        for name, trainer in trainers.items():  # alternate: load on the machine hits both alike
            rng.set_states(draws)  # the same random router logits: both variants route alike
            comm.barrier()
            comm.reset_traffic()
            start = time.perf_counter()
            result = trainer.train_step(data[name])
            seconds = time.perf_counter() - start
            traffic = comm.traffic()
            if step == args.warmup - 1 and name == "plain":  # choose the hot experts, as the monitor would
                for layer in layers:
                    counts = result.moe.tokens_per_expert[layer.layer_number - 1]
                    layer.set_hot_experts(choose_hot_experts(counts, args.hot_experts))
            if step < args.warmup:
                continue
            times[name].append(seconds)
            for kind in sent[name]:
                sent[name][kind].append(total(traffic.get(kind, 0)))
            if name == "plain":  # the plain run's traffic that belongs to the hot experts: their kept pairs
                for layer in layers:
                    counts = result.moe.kept_tokens_per_expert[layer.layer_number - 1]
                    hot_pairs += int(counts[layer.hot_experts.hot].sum())
                    all_pairs += int(counts.sum())
    rows = {}
    for name in trainers:
        step_s = total(common.median(times[name])) / world  # mean over ranks of each rank's median
        rows[name] = (np.mean(sent[name]["all_to_all"]), np.mean(sent[name]["hot_expert_sync"]), step_s)
    share = hot_pairs / max(all_pairs, 1)
    if comm.get_rank() == world - 1:
        print(f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} MoE layers of {args.experts} experts "
              f"(ffn {args.expert_ffn}, top-{args.topk}, grouped), seq {args.seq}, micro batch {args.micro_batch}, "
              f"EP={world}, {tokens} tokens per step; router bias std {args.bias_std}; {args.hot_experts} hot experts "
              f"per layer, capacity factor {args.capacity_factor}, cold token percent {args.cold_token_percent}")
        print("| variant | all-to-all MB/step | hot-expert exchange MB/step | together MB/step | step (ms) | tokens/s |")
        print("|---|---|---|---|---|---|")
        for name, (a2a, sync, step_s) in rows.items():
            print(f"| {name} | {a2a / 1e6:.3f} | {sync / 1e6:.3f} | {(a2a + sync) / 1e6:.3f} | {step_s * 1000:.0f} "
                  f"| {tokens / step_s:.1f} |")
        ratio = rows["hot"][0] / rows["plain"][0] if rows["plain"][0] else float("nan")
        print(f"hot experts' share of the pairs the plain variant computed: {share:.4f}")
        print(f"all-to-all bytes hot / plain: {ratio:.4f} (target <= 1 - share = {1 - share:.4f}); "
              f"tokens/s hot / plain: {rows['plain'][2] / rows['hot'][2]:.3f}")
    return {"rows": rows, "share": share}


if __name__ == "__main__":
    main()
