"""Index builders of Megatron-Core's datasets, in numpy (Megatron keeps them in C++ `helpers.cpp`).

- `build_document_index`: document ids repeated once per epoch and shuffled (the last epoch optionally
  shuffled on its own);
- `build_sample_index`: where each `seq_length + extra` token window starts in the concatenation of the
  document index, as (position in the document index, token offset) rows;
- `build_shuffle_index`: the order in which samples are served;
- `build_blending_indices` / `build_exhaustive_blending_indices`: which dataset, and which of its samples,
  each sample of a blend comes from.

Every function consumes random numbers from the `numpy.random.RandomState` it is given in the same order as
Megatron, so the same seed gives the same arrays.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """int32 [num_epochs x len(documents)]: the documents once per epoch, shuffled.

    With `separate_final_epoch` the first num_epochs - 1 epochs are shuffled together and the final epoch
    separately after them, so a final epoch that is only partly used still draws from every document.
    """
    if separate_final_epoch and num_epochs > 1:
        head = build_document_index(documents, num_epochs - 1, rng, False)
        tail = build_document_index(documents, 1, rng, False)
        return np.concatenate((head, tail))
    index = np.tile(np.asarray(documents), num_epochs).astype(np.int32)
    rng.shuffle(index)
    return index


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_epochs: int,
                       tokens_per_epoch: int, drop_last_partial_sequence: bool = True,
                       add_extra_token_to_sequence: bool = True) -> np.ndarray:
    """[num_samples + 1, 2] rows (i, offset): sample k starts at token `offset` of document
    `document_index[i]` of row k and ends where row k + 1 points (plus the extra token).

    Think of the documents of `document_index` laid end to end as one token stream. Sample k covers stream
    positions [k L, k L + L + e) with L = seq_length and e = 1 when samples carry one extra token (inputs and
    shifted labels), so consecutive samples overlap by e tokens and cross document boundaries freely. Row k
    names the document holding the first token and the offset in it. Rows after the first are located by
    the last token of the previous window (position k L + e - 1), which is how Megatron's walk over the
    documents lands on them, including its treatment of empty documents. When the final partial sample
    (kept with drop_last_partial_sequence=False) runs past the stream, its end row is the last document
    with offset `size - e`, as in Megatron.
    """
    if seq_length < 1 or num_epochs < 1:
        raise ValueError(f"sample index needs seq_length >= 1 and num_epochs >= 1, got {seq_length}, {num_epochs}")
    e = int(bool(add_extra_token_to_sequence))
    total = int(num_epochs) * int(tokens_per_epoch)
    if drop_last_partial_sequence:
        num_samples = (total - e) // seq_length
    else:  # Megatron computes this ceiling in single precision
        num_samples = int(np.ceil(np.float32(total - e) / np.float32(seq_length)))
    num_samples = max(num_samples, 0)
    document_index = np.asarray(document_index)
    sizes = np.asarray(sizes)
    largest = max(len(document_index), int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if largest <= np.iinfo(np.int32).max else np.int64
    out = np.zeros((num_samples + 1, 2), dtype=dtype)
    if num_samples == 0:
        return out
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)  # ends[j]: stream position just past document j
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    last_token = starts + (e - 1)
    which = np.searchsorted(ends, last_token, side="right")
    past_end = which >= len(document_index)
    which = np.minimum(which, len(document_index) - 1)
    offsets = starts - (ends[which] - lengths[which])
    if past_end.any():
        offsets[past_end] = lengths[-1] - e
    out[1:, 0] = which
    out[1:, 1] = offsets
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, total_size): [0, num_samples) shuffled, then [num_samples, total_size) shuffled
    on its own (Megatron keeps a separately-shuffled final epoch at the end)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_blending_indices(weights: Sequence[float], size: int):
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) for a weighted blend.

    Sample s goes to the dataset furthest behind its share: argmax_i weights[i] * max(s, 1) - taken[i]
    (first index wins ties), in float64 like Megatron; each dataset's samples are then taken in order.
    """
    w = [float(x) for x in weights]
    n = len(w)
    dataset_index = np.zeros(size, np.int16)
    sample_index = np.zeros(size, np.int64)
    taken = [0] * n
    if n == 2:  # the common case, without the inner loop
        w0, w1 = w
        t0 = t1 = 0
        di = bytearray(size)
        for s in range(size):
            x = s if s > 1 else 1.0
            if w1 * x - t1 > w0 * x - t0:
                di[s] = 1
                t1 += 1
            else:
                t0 += 1
        dataset_index[:] = np.frombuffer(bytes(di), np.uint8)
        for d in range(2):
            mask = dataset_index == d
            sample_index[mask] = np.arange(int(mask.sum()))
        return dataset_index, sample_index
    for s in range(size):
        x = float(s) if s > 1 else 1.0
        best, best_err = 0, w[0] * x - taken[0]
        for i in range(1, n):
            err = w[i] * x - taken[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[s] = best
        sample_index[s] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index


def build_exhaustive_blending_indices(sizes: Sequence[int]):
    """Blend that takes exactly sizes[i] samples from dataset i, interleaved in proportion to the sizes
    (the same greedy rule over the datasets not yet used up)."""
    sizes = [int(x) for x in sizes]
    total = sum(sizes)
    weights = [x / float(total) for x in sizes] if total else [0.0] * len(sizes)
    dataset_index = np.zeros(total, np.int16)
    sample_index = np.zeros(total, np.int64)
    taken = [0] * len(sizes)
    open_ = [i for i, x in enumerate(sizes) if x > 0]
    for s in range(total):
        x = max(float(s), 1.0)
        best, best_err = -1, -math.inf
        for i in open_:
            err = weights[i] * x - float(taken[i])
            if err > best_err:
                best, best_err = i, err
        dataset_index[s] = best
        sample_index[s] = taken[best]
        taken[best] += 1
        if taken[best] == sizes[best]:
            open_.remove(best)
    return dataset_index, sample_index
