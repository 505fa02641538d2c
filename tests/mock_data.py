"""Synthetic GPT data for tests: learnable, deterministic, no files, any vocabulary (the library's
`--mock-data` is Megatron's, in mindtron.data.gpt_dataset).

Documents are counting runs [k, k+1, ..., k+L-1] (mod the vocabulary, skipping the EOD id) of random start
and length, each followed by EOD; samples are consecutive windows of seq_length + 1 tokens over their
concatenation. A model learns "next = current + 1" quickly, so a falling loss is visible in a few steps.
"""
from __future__ import annotations

import numpy as np


class MockGPTDataset:
    """`num_samples` windows of `seq_length + 1` token ids (int64), identical for every seed-sharing rank."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234, eod: int = 0):
        if vocab_size < 3:
            raise ValueError(f"--mock-data needs a vocabulary of at least 3 tokens, got {vocab_size}")
        self.num_samples, self.seq_length, self.eod = int(num_samples), int(seq_length), int(eod)
        rng = np.random.default_rng(seed)
        needed = self.num_samples * self.seq_length + 1
        pieces, total = [], 0
        while total < needed:
            length = int(rng.integers(seq_length // 2 + 1, 2 * seq_length + 1))
            run = (int(rng.integers(0, vocab_size)) + np.arange(length)) % (vocab_size - 1)
            run = run + (run >= eod)  # every id but the EOD one
            pieces += [run, [eod]]
            total += length + 1
        self.tokens = np.concatenate(pieces).astype(np.int64)[:needed]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} mock samples")
        start = index * self.seq_length
        return {"text": self.tokens[start:start + self.seq_length + 1]}
