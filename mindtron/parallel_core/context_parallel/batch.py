"""Each context rank's part of a sequence, with Megatron's causal load balancing.

The sequence of length s is cut into 2 x cp chunks of s / (2 cp) tokens; context rank r keeps chunks r and
2 cp - 1 - r. Under a causal mask the early chunks attend to few keys and the late ones to many, so pairing
one early with one late chunk gives every rank the same attention work (Megatron's
get_batch_on_this_cp_rank).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindtron.parallel_core import parallel_state as ps


def rank_chunks(cp_rank: int, cp: int) -> List[int]:
    """Global chunk indices (of 2 x cp) that context rank `cp_rank` holds, in its local order."""
    return [cp_rank, 2 * cp - 1 - cp_rank]


def chunk_positions(chunks, chunk_len: int) -> np.ndarray:
    """Global token positions of the concatenated `chunks` (int32)."""
    return np.concatenate([np.arange(c * chunk_len, (c + 1) * chunk_len) for c in chunks]).astype(np.int32)


def local_positions(seq_length: int, cp_rank: int, cp: int) -> np.ndarray:
    """Global positions of the tokens context rank `cp_rank` holds: [s / cp]."""
    return chunk_positions(rank_chunks(cp_rank, cp), seq_length // (2 * cp))


def this_rank_positions(seq_length: int) -> np.ndarray:
    """Global positions of this rank's tokens (0..s-1 without context parallelism)."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return np.arange(seq_length, dtype=np.int32)
    return local_positions(seq_length, ps.get_context_parallel_rank(), cp)


def _is_plain_causal(mask) -> bool:
    m = mask.asnumpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim != 4 or m.shape[-1] != m.shape[-2]:
        return False
    s = m.shape[-1]
    return bool((m == np.triu(np.ones((s, s), np.bool_), 1)).all())


def get_batch_on_this_cp_rank(batch: Dict, seq_length: int, cp_rank: int = None, cp: int = None) -> Dict:
    """This context rank's part of a micro-batch (Megatron's get_batch_on_this_cp_rank).

    tokens, labels, loss_mask, position_ids [b, s] -> [b, s / cp] (the positions keep their true values, so
    RoPE and learned position embeddings see where each token sits); attention_mask [b or 1, 1, s, s] ->
    [b or 1, 1, s / cp, s] (this rank's query rows, every key); a plain causal mask is dropped (None), since
    context-parallel attention builds the causal structure itself and skips the blocks it hides. A batch
    whose sequences already have s / cp tokens is returned as it is (split by the caller's get_batch).
    """
    cp = ps.get_context_parallel_world_size() if cp is None else cp
    if cp == 1:
        return batch
    cp_rank = ps.get_context_parallel_rank() if cp_rank is None else cp_rank
    tokens = batch.get("tokens")
    if tokens is not None and tokens.shape[1] == seq_length // cp and seq_length // cp != seq_length:
        return batch  # already split
    index = local_positions(seq_length, cp_rank, cp)
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
        elif key == "attention_mask":
            out[key] = None if _is_plain_causal(value) else _take(value, index, 2)
        elif key in ("tokens", "labels", "loss_mask", "position_ids"):
            if value.shape[1] != seq_length:
                raise ValueError(f"context parallel: batch[{key!r}] has {value.shape[1]} positions, expected "
                                 f"--seq-length {seq_length}")
            out[key] = _take(value, index, 1)
        else:
            out[key] = value
    return out


def _take(value, index: np.ndarray, dim: int):
    if isinstance(value, Tensor):
        return ops.gather(value, Tensor(index, ms.int32), dim)
    return np.take(np.asarray(value), index, axis=dim)
