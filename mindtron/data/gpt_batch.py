"""Turn samples of seq_length + 1 token ids into the tensors GPTModel takes (Megatron's get_batch)."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List

import numpy as np

from mindtron.legacy_model.eod_mask import get_ltor_masks_and_position_ids


def collate(samples: List[dict]) -> Dict[str, np.ndarray]:
    """Stack samples' "text" windows into [b, s + 1]."""
    return {"text": np.stack([np.asarray(s["text"], np.int64) for s in samples])}


def make_gpt_batch(text: np.ndarray, eod: int, reset_position_ids: bool = False, reset_attention_mask: bool = False,
                   eod_mask_loss: bool = False) -> Dict[str, np.ndarray]:
    """[b, s + 1] ids -> tokens, labels (shifted by one), loss_mask, attention_mask, position_ids."""
    tokens, labels = text[:, :-1], text[:, 1:]
    attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss)
    return {"tokens": tokens.astype(np.int32), "labels": labels.astype(np.int32), "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids}


class DataLoader:
    """Micro-batches of `dataset` for this rank, following a sampler of index lists."""

    def __init__(self, dataset, batch_sampler: Iterable[List[int]]):
        self.dataset, self.batch_sampler = dataset, batch_sampler

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for indices in self.batch_sampler:
            yield collate([self.dataset[i] for i in indices])
