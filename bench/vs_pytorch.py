"""mindtron's single-process training step against the same GPT written plainly in PyTorch (CPU, eager).

    python bench/vs_pytorch.py                  # the 17M GPT (seq 512, micro batch 4): a few minutes
    python bench/vs_pytorch.py --tiny           # seconds
    python bench/vs_pytorch.py --no-jit-layers  # mindtron with its layers eager instead of compiled

Same maths on both sides: GPT-2 style (pre-norm LayerNorm, fused QKV with biases, causal softmax attention,
tanh-GeLU MLP, learned positions, final LayerNorm, logits tied to the word embedding), fp32, masked mean cross
entropy, gradient clipping at 1.0 and AdamW (weight decay 0.01 on matrices). mindtron runs through the
Trainer's train_step as pretrain() does; PyTorch is `torch.nn` + `loss.backward()` + `clip_grad_norm_` +
`torch.optim.AdamW`, the way a PyTorch user writes it (attention as matmul + mask + softmax, like mindtron's
maths; `--torch-sdpa` uses `F.scaled_dot_product_attention` instead). Steps alternate between the two sides
so that load from other jobs hits both alike. Prints each side's median step and tokens/s and, last,
`ratio: R` = mindtron tokens/s / PyTorch tokens/s (R >= 1: mindtron is at least as fast).

PyTorch comes with mindtron's test extra (`pip install -e .[test]`); without it the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore's own warnings would bury the figures
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def torch_gpt(torch, args, sdpa: bool):
    """The benchmark GPT in plain PyTorch: tokens [b, s], labels [b, s] -> mean cross entropy."""
    nn, F = torch.nn, torch.nn.functional
    std, out_std = 0.02, 0.02 / math.sqrt(2.0 * args.layers)

    def linear(fan_in, fan_out, init_std):
        layer = nn.Linear(fan_in, fan_out)
        nn.init.normal_(layer.weight, std=init_std)
        nn.init.zeros_(layer.bias)
        return layer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.head_dim = args.heads, args.hidden // args.heads
            self.ln1, self.ln2 = nn.LayerNorm(args.hidden), nn.LayerNorm(args.hidden)
            self.qkv, self.proj = linear(args.hidden, 3 * args.hidden, std), linear(args.hidden, args.hidden, out_std)
            self.fc1, self.fc2 = linear(args.hidden, args.ffn, std), linear(args.ffn, args.hidden, out_std)
            self.drop = nn.Dropout(args.dropout)

        def forward(self, x, mask_bias):
            b, s, h = x.shape
            q, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2)   # [b, n, s, hn]
                       for t in self.qkv(self.ln1(x)).split(h, -1))
            if sdpa:
                context = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         dropout_p=args.dropout if self.training else 0.0)
            else:
                scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
                context = self.drop(scores.softmax(-1)) @ v
            x = x + self.drop(self.proj(context.transpose(1, 2).reshape(b, s, h)))
            return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh")))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(args.vocab, args.hidden)
            self.wpe = nn.Embedding(args.seq, args.hidden)
            nn.init.normal_(self.wte.weight, std=std)
            nn.init.normal_(self.wpe.weight, std=std)
            self.blocks = nn.ModuleList([Block() for _ in range(args.layers)])
            self.ln_f = nn.LayerNorm(args.hidden)
            self.drop = nn.Dropout(args.dropout)
            # Megatron's masked score: -10000 above the diagonal
            self.register_buffer("mask_bias", torch.full((args.seq, args.seq), -10000.0).triu(1))

        def forward(self, tokens, labels):
            x = self.drop(self.wte(tokens) + self.wpe.weight[: tokens.shape[1]])
            for block in self.blocks:
                x = block(x, self.mask_bias)
            logits = self.ln_f(x) @ self.wte.weight.t()   # [b, s, v], tied embedding
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))

    return GPT()


class TorchTrainer:
    """loss.backward() + clip_grad_norm_(1.0) + AdamW(lr, weight decay 0.01 on matrices)."""

    def __init__(self, torch, model, lr):
        self.torch, self.model = torch, model
        decay = [p for p in model.parameters() if p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.dim() == 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def train_step(self, text) -> float:
        torch = self.torch
        text = torch.from_numpy(text)
        loss = self.model(text[:, :-1], text[:, 1:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser, steps=6, warmup=2)
    parser.add_argument("--torch-sdpa", action="store_true",
                        help="PyTorch attention through F.scaled_dot_product_attention (is_causal)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: PyTorch's own choice)")
    args = common.resolve_sizes(parser.parse_args(argv))
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: bench/vs_pytorch.py needs it (pip install -e .[test]); skipped")
        return None
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from mindtron.parallel_core.runtime import init_runtime
    init_runtime()

    config = common.all_config(args)
    trainer = common.build_mindtron_trainer(config)
    mindtron_data = common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed)
    torch.manual_seed(args.seed)
    reference = TorchTrainer(torch, torch_gpt(torch, args, args.torch_sdpa), config.optimizer_config.learning_rate)
    reference.model.train()
    torch_data = common.synthetic_text(args.micro_batch, args.seq, args.vocab, args.seed)

    print(f"{common.describe_model(args, trainer, config)}; PyTorch {torch.__version__} "
          f"({torch.get_num_threads()} threads, attention {'sdpa' if args.torch_sdpa else 'matmul + softmax'})")
    times, losses = common.alternate_steps({"mindtron": lambda: trainer.train_step(mindtron_data).loss,
                                            "pytorch": lambda: reference.train_step(next(torch_data)["text"])},
                                           args.warmup, args.steps)
    tokens = args.micro_batch * args.seq
    rate = {}
    for side in ("pytorch", "mindtron"):
        step_s = common.median(times[side])
        rate[side] = tokens / step_s
        ms_list = " ".join(f"{t * 1000:.0f}" for t in times[side])
        print(f"{side:9s} median step {step_s * 1000:9.1f} ms  {rate[side]:8.1f} tokens/s   "
              f"(steps: {ms_list} ms; loss {float(losses[side][0]):.3f} -> {float(losses[side][-1]):.3f})")
    ratio = rate["mindtron"] / rate["pytorch"]
    print(f"ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
