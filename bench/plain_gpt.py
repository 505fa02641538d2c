"""The baseline of bench/step_overhead.py: the same GPT written directly with mindspore.nn / ops.

Same maths as mindtron's GPT-2 style GPTModel (pre-norm LayerNorm layers, fused QKV with biases, causal
softmax attention, tanh-GeLU MLP, learned positions, final LayerNorm, logits tied to the word embedding,
masked mean cross entropy), trained the way MindSpore's own examples train: `mindspore.value_and_grad`
over the parameters, clipping by the global norm, and `mindspore.experimental.optim.AdamW` with a decay
and a no-decay group. It uses MindSpore's standard layers (nn.Dense: MatMul with a
transposed weight + BiasAdd; nn.LayerNorm) and the op forms MINDSPORE_CPU.md measured fastest on CPU
(BatchMatMul attention with an additive mask, tanh-GeLU from mint.tanh, log_softmax + gather for the loss),
and runs eagerly in PyNative mode, like mindtron. It is meant as a fair, ordinary implementation: no
mindtron code, and none of the CPU-specific workarounds mindtron has (tiled masks, custom softmax gradient).
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.experimental.optim import AdamW


def _param(shape, std, name):
    return Parameter(initializer(Normal(std), shape, ms.float32), name=name)


def gelu_tanh(x):
    return x * 0.5 * (1.0 + mint.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def Linear(fan_in, fan_out, std):
    """MindSpore's standard dense layer (MatMul with a transposed weight + BiasAdd), Megatron's init."""
    return nn.Dense(fan_in, fan_out, weight_init=Normal(std), bias_init="zeros")


class Block(nn.Cell):
    """Pre-norm transformer layer on [b, s, h]."""

    def __init__(self, i, hidden, heads, ffn, std, out_std, dropout):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, hidden // heads, dropout
        self.ln1 = nn.LayerNorm((hidden,), epsilon=1e-5)
        self.qkv = Linear(hidden, 3 * hidden, std)
        self.proj = Linear(hidden, hidden, out_std)
        self.ln2 = nn.LayerNorm((hidden,), epsilon=1e-5)
        self.fc1 = Linear(hidden, ffn, std)
        self.fc2 = Linear(ffn, hidden, out_std)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _drop(self, x):
        return ops.dropout(x, self.dropout) if self.training and self.dropout > 0 else x

    def construct(self, x, mask_bias):
        b, s, h = x.shape
        q, k, v = ops.split(self.qkv(self.ln1(x)), h, -1)
        q = ops.transpose(q.reshape(b, s, self.heads, self.head_dim), (0, 2, 1, 3))  # [b, n, s, hn]
        k = ops.transpose(k.reshape(b, s, self.heads, self.head_dim), (0, 2, 1, 3))
        v = ops.transpose(v.reshape(b, s, self.heads, self.head_dim), (0, 2, 1, 3))
        probs = self._drop(ops.softmax(self.bmm_t(q, k) * self.scale + mask_bias, -1))
        context = ops.transpose(self.bmm(probs, v), (0, 2, 1, 3)).reshape(b, s, h)
        x = x + self._drop(self.proj(context))
        return x + self._drop(self.fc2(gelu_tanh(self.fc1(self.ln2(x)))))


class PlainGPT(nn.Cell):
    """tokens [b, s] -> masked mean next-token cross entropy."""

    def __init__(self, vocab, hidden, heads, layers, ffn, seq, dropout=0.0, std=0.02):
        super().__init__()
        out_std = std / math.sqrt(2.0 * layers)  # Megatron's scaled init for the output projections
        self.wte = _param((vocab, hidden), std, "wte")
        self.wpe = _param((seq, hidden), std, "wpe")
        self.blocks = nn.CellList([Block(i, hidden, heads, ffn, std, out_std, dropout) for i in range(layers)])
        self.ln_f = nn.LayerNorm((hidden,), epsilon=1e-5)
        self.logits = ops.MatMul(transpose_b=True)
        self.dropout = dropout
        # additive causal mask, built once: -10000 above the diagonal (Megatron's masked score)
        self.mask_bias = Tensor(np.triu(np.full((seq, seq), -10000.0, np.float32), 1)[None, None])
        self.positions = Tensor(np.arange(seq, dtype=np.int32))

    def construct(self, tokens, labels, loss_mask):
        b, s = tokens.shape
        x = ops.gather(self.wte, tokens, 0) + ops.gather(self.wpe, self.positions, 0)
        if self.training and self.dropout > 0:
            x = ops.dropout(x, self.dropout)
        for block in self.blocks:
            x = block(x, self.mask_bias)
        x = self.ln_f(x).reshape(b * s, -1)
        logp = ops.log_softmax(self.logits(x, self.wte), -1)  # [b s, v]
        nll = -ops.gather_elements(logp, 1, labels.reshape(-1, 1)).reshape(-1)
        mask = loss_mask.reshape(-1)
        return (nll * mask).sum() / mask.sum()


class PlainTrainer:
    """value_and_grad + global-norm clipping + AdamW (weight decay on matrices only), one micro-batch per step."""

    def __init__(self, model: PlainGPT, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, clip=1.0):
        self.model = model
        params = model.trainable_params()
        decay = [p for p in params if len(p.shape) > 1]
        no_decay = [p for p in params if len(p.shape) == 1]
        self.optimizer = AdamW([{"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)
        self.grad_fn = ms.value_and_grad(model, None, self.optimizer.parameters)
        self.clip = clip

    def train_step(self, text: np.ndarray) -> float:
        """One step on [b, s + 1] token ids; returns the loss (a host read, as any training log does)."""
        tokens, labels = Tensor(text[:, :-1].astype(np.int32)), Tensor(text[:, 1:].astype(np.int32))
        loss_mask = Tensor(np.ones(tokens.shape, np.float32))
        loss, grads = self.grad_fn(tokens, labels, loss_mask)
        if self.clip > 0:
            # mutable: clip_by_global_norm is compiled; constant tensors would recompile it every step
            grads = ops.clip_by_global_norm(ms.mutable(tuple(grads)), self.clip)
        self.optimizer(grads)
        return float(loss.asnumpy())
