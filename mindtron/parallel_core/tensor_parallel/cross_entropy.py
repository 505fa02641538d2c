"""Cross entropy over logits whose vocabulary is split across the tensor-parallel group.

Each rank holds logits [s, b, v/tp] for its vocabulary range. The loss needs only three reductions over the
group (the max for stability, the partition function, and the target's logit), never the full logits:

    loss = log(sum_j exp(z_j - m)) - (z_target - m)

With label smoothing `a` (Megatron's form, vocabulary V): smoothing = a V / (V - 1) and
    loss = (1 - smoothing) * loss - smoothing * mean_j log p_j.

The backward is the closed form p - (1 - smoothing) onehot(target) - smoothing / V, from the softmax kept
by the forward.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.parallel_core import comm, cpu_kernels
from mindtron.parallel_core.comm import ProcessGroup
from mindtron.parallel_core.tensor_parallel.mappings import _tp_group
from mindtron.parallel_core.tensor_parallel.utils import expand_last


class _VocabParallelCrossEntropy(nn.Cell):
    """Returns (per-token loss [s, b], softmax [s, b, v/tp]); the softmax output only feeds the bprop.

    Works on the logits flattened to [s b, v/tp] and combines only same-shape tensors (`expand_last`):
    on CPU both 3-D reductions and broadcasting elementwise ops are many times slower than their 2-D,
    same-shape forms, and this cell touches the largest activation of the model.
    """

    def __init__(self, group: ProcessGroup, label_smoothing: float):
        super().__init__()
        self.group, self.label_smoothing = group, label_smoothing

    def _local_target(self, target: Tensor, vocab_local: int):
        start = max(self.group.rank, 0) * vocab_local
        outside = ops.logical_or(target < start, target >= start + vocab_local)
        local = ops.where(outside, ops.zeros_like(target), target - start)
        return local, outside

    def construct(self, logits, target):
        vocab_local = logits.shape[-1]
        vocab = vocab_local * self.group.size
        z = logits.reshape(-1, vocab_local)  # [n, v/tp], n = s b
        logits_max = comm.all_reduce(z.max(axis=-1), self.group, op="max")  # [n]
        shifted = z - expand_last(logits_max, vocab_local)
        local, outside = self._local_target(target.reshape(-1), vocab_local)
        picked = ops.gather_elements(shifted, 1, local.reshape(-1, 1)).reshape(-1)
        picked = comm.all_reduce(ops.where(outside, ops.zeros_like(picked), picked), self.group)
        exp = ops.exp(shifted)
        sum_exp = comm.all_reduce(exp.sum(axis=-1), self.group)  # [n]
        log_z = ops.log(sum_exp)
        loss = log_z - picked
        softmax = exp * expand_last(1.0 / sum_exp, vocab_local)
        if self.label_smoothing > 0:
            smoothing = self.label_smoothing * vocab / (vocab - 1)
            sum_log_probs = comm.all_reduce(shifted.sum(axis=-1), self.group) - vocab * log_z
            loss = (1.0 - smoothing) * loss - smoothing * sum_log_probs / vocab
        return loss.reshape(logits.shape[:-1]), softmax.reshape(logits.shape)

    def bprop(self, logits, target, out, dout):
        softmax, dloss = out[1], dout[0]
        vocab_local = logits.shape[-1]
        vocab = vocab_local * self.group.size
        p = softmax.reshape(-1, vocab_local)
        local, outside = self._local_target(target.reshape(-1), vocab_local)
        smoothing = self.label_smoothing * vocab / (vocab - 1) if self.label_smoothing > 0 else 0.0
        hit = ops.one_hot(local, vocab_local, Tensor(1.0, p.dtype), Tensor(0.0, p.dtype))
        # targets held by another rank, or outside the vocabulary, hit nothing here (as in the forward)
        hit = hit * expand_last(ops.logical_not(outside).astype(p.dtype), vocab_local)
        grad = p - hit if not smoothing else p - (1.0 - smoothing) * hit - smoothing / vocab
        grad = grad * expand_last(dloss.reshape(-1), vocab_local)
        return grad.reshape(logits.shape), ops.zeros_like(target)


_cache: dict = {}


def vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                                 group: Optional[ProcessGroup] = None) -> Tensor:
    """Per-token cross entropy [s, b] from vocabulary-split logits [s, b, v/tp] and full-vocab ids [s, b]."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    group = _tp_group(group)
    vocab = vocab_parallel_logits.shape[-1]
    # the whole vocabulary here (no tensor parallelism): one fused CPU kernel pass per row where it is built
    fused = group.size == 1 and cpu_kernels.enabled(vocab_parallel_logits.dtype)
    key = (group.ranks, float(label_smoothing), fused and vocab)
    cell = _cache.get(key)
    if cell is None:
        cell = _cache[key] = (cpu_kernels.CrossEntropy(float(label_smoothing), vocab) if fused
                              else _VocabParallelCrossEntropy(group, float(label_smoothing)))
    if fused:
        rows = cell(vocab_parallel_logits.reshape(-1, vocab), target.astype(ms.int32).reshape(-1))[0]
        return rows.reshape(target.shape)
    return cell(vocab_parallel_logits, target.astype(ms.int32))[0]
