"""Iteration log lines: Megatron's (iteration, consumed samples, time, lr, loss, loss scale, grad norm,
skipped/nan counts, tokens/s, model TFLOP/s) and document 002's `Epoch: 0, Step: N, Loss: X, Time: Y ms`.

Printed (flushed to stdout, which msrun puts in msrun_log/worker_*.log) by the last rank of the job, as
Megatron's print_rank_last does: it sits on the last pipeline stage, so it holds the loss.
"""
from __future__ import annotations

import math
import time

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps


def model_flops_per_token(model_config) -> float:
    """Forward + backward FLOPs per token: 3 x (2 x matmul weights + attention scores and context + logits).
    An MoE layer counts its router, the top-k experts a token goes through and the shared expert."""
    c = model_config
    q_width = c.num_attention_heads * c.kv_channels
    kv_width = 2 * c.num_query_groups * c.kv_channels
    glu = 3 if c.gated_linear_unit else 2
    moe = c.moe_config
    total = 0.0
    for layer in range(c.num_layers):
        if moe.is_moe_layer(layer, c.num_layers):
            mlp = (c.hidden_size * moe.num_experts + moe.moe_router_topk * c.hidden_size * moe.moe_ffn_hidden_size * glu
                   + c.hidden_size * (moe.moe_shared_expert_intermediate_size or 0) * glu)
        else:
            mlp = c.hidden_size * c.ffn_hidden_size * glu
        total += 2 * (c.hidden_size * (q_width + kv_width) + q_width * c.hidden_size + mlp)
        total += 2 * 2 * c.seq_length * q_width  # q k^T and probs v, per token
    logits = 2 * c.hidden_size * c.vocab_size
    return 3.0 * (total + logits)


def moe_log_parts(stats, moe) -> list:
    """Megatron's MoE entries of the iteration line: each auxiliary loss averaged over the MoE layers, and
    with --moe-per-layer-logging one entry per MoE layer (1-based layer numbers)."""
    if stats is None:
        return []
    parts = [f"{name}: {value:.6E}" for name, value in stats.losses.items()]
    if moe.moe_per_layer_logging:
        for name, values in stats.per_layer.items():
            parts += [f"{name} layer {i + 1}: {v:.6E}" for i, v in enumerate(values)
                      if moe.is_moe_layer(i, len(values))]
    return parts


class TrainingLogger:
    """Formats and prints the log lines of one run."""

    def __init__(self, config):
        self.config = config
        self.log_interval = max(1, config.training_config.log_interval or 1)
        self.skipped = 0
        self.nan = 0
        self.flops_per_token = model_flops_per_token(config.model_config)
        self.world = ps.get_layout().world_size
        self.printing = comm.get_rank() == comm.get_world_size() - 1

    def iteration(self, iteration: int, consumed_samples: int, elapsed_ms: float, result, scheduler,
                  global_batch: int) -> None:
        self.skipped += int(result.skipped)
        self.nan += int(not math.isfinite(result.loss))
        if not self.printing:
            return
        lr = self.learning_rate(scheduler)
        print(f"Epoch: 0, Step: {iteration}, Loss: {result.loss:.16f}, Time: {elapsed_ms:.2f} ms", flush=True)
        if iteration % self.log_interval:
            return
        tokens = global_batch * self.config.model_config.seq_length
        seconds = max(elapsed_ms / 1000.0, 1e-9)
        tflops = tokens * self.flops_per_token / seconds / self.world / 1e12
        total = self.config.training_config.training_iters
        parts = [f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{total:8d}",
                 f"consumed samples: {consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {elapsed_ms:.1f}"]
        if self.config.training_config.log_throughput:
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
        parts += [f"learning rate: {lr:.6E}", f"global batch size: {global_batch:5d}",
                  f"lm loss: {result.loss:.6E}", f"loss scale: {result.loss_scale:.1f}"]
        if result.grad_norm is not None:
            parts.append(f"grad norm: {result.grad_norm:.3f}")
        if getattr(result, "num_zeros", None) is not None:
            parts.append(f"num zeros: {result.num_zeros}")
        if getattr(result, "params_norm", None) is not None:
            parts.append(f"params norm: {result.params_norm:.3f}")
        parts += moe_log_parts(result.moe, self.config.model_config.moe_config)
        parts += [f"number of skipped iterations: {self.skipped:3d}", f"number of nan iterations: {self.nan:3d}",
                  f"tokens per second: {tokens / seconds:.1f}", f"TFLOP/s per rank: {tflops:.4f}"]
        print(" | ".join(parts) + " |", flush=True)
        self.skipped = self.nan = 0

    @staticmethod
    def learning_rate(scheduler) -> float:
        """The scheduler's current learning rate (of the first parameter group)."""
        return scheduler.get_lr(scheduler.optimizer.param_groups[0]) if hasattr(scheduler, "get_lr") else float("nan")

    def message(self, text: str) -> None:
        """A line from the logging rank."""
        if self.printing:
            print(text, flush=True)

    def evaluation(self, iteration: int, loss: float, split: str = "") -> None:
        """Megatron's line: ` validation loss at iteration N[ on test set] | lm loss value: X | lm loss PPL: Y |`."""
        if self.printing:
            where = f"iteration {iteration}" + (f" on {split} set" if split else "")
            ppl = math.exp(min(20.0, loss))
            print(f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |", flush=True)
