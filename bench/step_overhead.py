"""mindtron's single-process training step against the same GPT written directly in MindSpore.

    python bench/step_overhead.py                 # 17M-parameter GPT, seq 512, micro batch 4 (a few minutes)
    python bench/step_overhead.py --tiny          # seconds
    python bench/step_overhead.py --layers 2 --seq 256 --steps 4   # under a minute
    python bench/step_overhead.py --jit-layers    # mindtron with its transformer layers compiled (ms.jit)

Both run in this process, fp32, PyNative: mindtron through the machinery pretrain() uses (GPTModel, the
Trainer's train_step with its schedule, gradient buffer, inf check, clipping at 1.0 and Megatron's AdamW), the
baseline (bench/plain_gpt.py) as value_and_grad + clip_by_global_norm + AdamW. Steps alternate between the
two so that load from other jobs on the machine hits both alike. Prints each side's median step time and,
as the last line, `ratio: R` = baseline median / mindtron median (R >= 1: mindtron is as fast or faster).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore's own warnings would bury the figures

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser, steps=8, warmup=2)
    args = common.resolve_sizes(parser.parse_args(argv))

    from mindtron.parallel_core.runtime import init_runtime
    init_runtime()
    import mindspore as ms
    from plain_gpt import PlainGPT, PlainTrainer

    config = common.all_config(args)
    trainer = common.build_mindtron_trainer(config)
    mindtron_data = common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed)
    ms.set_seed(args.seed)
    plain = PlainTrainer(PlainGPT(args.vocab, args.hidden, args.heads, args.layers, args.ffn, args.seq,
                                  args.dropout), lr=config.optimizer_config.learning_rate)
    plain.model.set_train(True)
    plain_data = common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed)

    print(common.describe_model(args, trainer, config))
    times, losses = common.alternate_steps({"mindtron": lambda: trainer.train_step(mindtron_data).loss,
                                            "plain": lambda: plain.train_step(next(plain_data)["text"])},
                                           args.warmup, args.steps)
    for side in ("plain", "mindtron"):
        ms_list = " ".join(f"{t * 1000:.0f}" for t in times[side])
        print(f"{side:9s} median step {common.median(times[side]) * 1000:9.1f} ms   "
              f"(steps: {ms_list} ms; loss {losses[side][0]:.3f} -> {losses[side][-1]:.3f})")
    ratio = common.median(times["plain"]) / common.median(times["mindtron"])
    print(f"ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
