"""From Megatron's data flags to train/valid/test datasets (Megatron-Core's BlendedMegatronDatasetBuilder).

    train, valid, test = build_gpt_datasets(args, [n_train, n_valid, n_test])

Cases, per split (Megatron's rules):
- `--mock-data`, or no data flags at all: Megatron's mock documents, split 1:1:1 unless --split says otherwise;
- `--data-path A` (one prefix, no weight): the split's documents of A;
- `--data-path 0.3 A 0.7 B`: each dataset builds ceil(ceil(n x w) x 1.005) samples of the split, and a blend
  of sum_i ceil(n x w_i) samples mixes them by weight;
- `--data-path A B` (no weights): each dataset gives one epoch of the split, blended in proportion to their
  sizes, at most n samples;
- `--train-data-path` / `--valid-data-path` / `--test-data-path`: the same per split, using all of each
  dataset's documents; a split without a path gives None.
A split with zero width in `--split` gives None. Every dataset yields `{"text": int64[seq_length + 1]}`.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Type

import numpy as np

from mindtron.data.blended import BlendedDataset, sizes_per_dataset
from mindtron.data.gpt_dataset import (GPTDataset, GPTDatasetConfig, MockGPTDataset, build_indexed_dataset,
                                       build_mock_low_level_dataset)
from mindtron.data.utils import Split, get_blend_and_blend_per_split, normalize, split_document_range

logger = logging.getLogger("mindtron.data")


class BlendedMegatronDatasetBuilder:
    """Builds the three splits of `cls` (GPTDataset or MockGPTDataset) for `sizes` samples per split."""

    def __init__(self, cls: Type[GPTDataset], sizes: Sequence[Optional[int]], config: GPTDatasetConfig):
        if len(sizes) != len(Split):
            raise ValueError(f"need one sample count per split (train, valid, test), got {list(sizes)}")
        self.cls, self.sizes, self.config = cls, [None if s is None else int(s) for s in sizes], config
        self._low_level_cache: dict = {}

    def build(self) -> List[Optional[Any]]:
        """[train, valid, test], None for splits that get no data."""
        cfg = self.config
        if cfg.mock:
            return self._build_splits(None, cfg.split_matrix, self.sizes)
        if cfg.blend is not None:
            prefixes, weights = cfg.blend
            if weights is not None:
                weights = normalize(weights)
            matrix = cfg.split_matrix
            if len(prefixes) == 1 and weights is None:
                return self._build_splits(prefixes[0], matrix, self.sizes)
            if weights is None:
                buffers = [[None] * len(Split) for _ in prefixes]
                targets = None
            else:
                targets = sizes_per_dataset(weights, self.sizes)
                buffers = sizes_per_dataset(weights, self.sizes, surplus=cfg.mid_level_dataset_surplus)
            per_split = self._build_many(prefixes, matrix, buffers)
            out: List[Optional[Any]] = [None] * len(Split)
            for i in range(len(Split)):
                if matrix[i] is None:
                    continue
                out[i] = self._blend(per_split[i], weights, targets, i, prefixes)
            return out
        out = [None] * len(Split)
        for i, blend in enumerate(cfg.blend_per_split):
            if blend is None:
                continue
            prefixes, weights = blend
            if weights is not None:
                weights = normalize(weights)
            matrix = [None] * len(Split)
            matrix[i] = (0.0, 1.0)
            sizes = [0] * len(Split)
            sizes[i] = self.sizes[i]
            if len(prefixes) == 1:
                out[i] = self._build_splits(prefixes[0], matrix, sizes)[i]
                continue
            if weights is None:
                buffers, targets = [[None] * len(Split) for _ in prefixes], None
            else:
                targets = sizes_per_dataset(weights, sizes)
                buffers = sizes_per_dataset(weights, sizes, surplus=self.config.mid_level_dataset_surplus)
            out[i] = self._blend(self._build_many(prefixes, matrix, buffers)[i], weights, targets, i, prefixes)
        return out

    def _blend(self, datasets, weights, targets, i, prefixes) -> BlendedDataset:
        size_requested = self.sizes[i]
        if weights is not None:
            if size_requested is None:
                raise ValueError("weighted blends need a sample count for every split")
            size = sum(t[i] for t in targets)
        else:
            weights = [len(d) for d in datasets]
            if sum(weights) <= 0:
                raise ValueError(f"the {Split(i).name} split of {prefixes} has no samples")
            size = None if size_requested is None else min(size_requested, sum(weights))
            if size is not None:
                keep = [w > 0 for w in weights]
                if not all(keep):  # a dataset with no samples in this split cannot carry weight
                    datasets = [d for d, k in zip(datasets, keep) if k]
                    weights = [w for w, k in zip(weights, keep) if k]
        return BlendedDataset(datasets, weights, size, self.config)

    def _build_many(self, prefixes, matrix, buffers) -> List[List[Optional[GPTDataset]]]:
        per_split: List[List[Optional[GPTDataset]]] = [[] for _ in Split]
        for prefix, sizes in zip(prefixes, buffers):
            for i, ds in enumerate(self._build_splits(prefix, matrix, sizes)):
                per_split[i].append(ds)
        return per_split

    def _build_splits(self, prefix: Optional[str], matrix, sizes) -> List[Optional[GPTDataset]]:
        if prefix is None:
            low = build_mock_low_level_dataset(self.config)
        else:
            low = build_indexed_dataset(prefix, self.config)
        count = len(low.sequence_lengths)
        out: List[Optional[GPTDataset]] = []
        for i, split in enumerate(Split):
            if matrix[i] is None:
                out.append(None)
                continue
            begin, end = split_document_range(matrix[i], count)
            indices = np.arange(begin, end, dtype=np.int32)
            out.append(self.cls(low, prefix, indices, sizes[i], split, self.config))
        return out


def _get(args, name: str, default):
    value = getattr(args, name, None)
    return default if value is None else value


def gpt_dataset_config_from_args(args, tokenizer=None) -> GPTDatasetConfig:
    """GPTDatasetConfig from Megatron's argument namespace (Megatron's core_gpt_dataset_config_from_args)."""
    if tokenizer is None:
        from mindtron.data.tokenizers import build_tokenizer
        tokenizer = build_tokenizer(args)
    blend, blend_per_split = (None, None)
    if not getattr(args, "mock_data", False):
        blend, blend_per_split = get_blend_and_blend_per_split(args)
    split = getattr(args, "split", None)
    if blend is not None and split is None:
        split = "969, 30, 1"
        logger.warning("--split not given with --data-path; using Megatron's legacy default '969, 30, 1'")
    if blend_per_split is not None and split is not None:
        logger.warning("--split is ignored with --train-data-path / --valid-data-path / --test-data-path")
        split = None
    config = GPTDatasetConfig(
        random_seed=int(_get(args, "seed", 1234)),
        sequence_length=int(args.seq_length),
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=getattr(args, "data_cache_path", None),
        mmap_bin_files=bool(_get(args, "mmap_bin_files", True)),
        tokenizer=tokenizer,
        reset_position_ids=bool(getattr(args, "reset_position_ids", False)),
        reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)),
        eod_mask_loss=bool(getattr(args, "eod_mask_loss", False)),
        drop_last_partial_validation_sequence=bool(_get(args, "drop_last_partial_validation_sequence", True)),
        mid_level_dataset_surplus=float(_get(args, "mid_level_dataset_surplus", 0.005)),
    )
    return config


def build_gpt_datasets(args, num_samples: Sequence[Optional[int]]):
    """(train, valid, test) GPT datasets for Megatron's flags in `args` and [train, valid, test] sample
    counts; a split that gets no data is None. Items are {"text": int64[seq_length + 1]}.

    Also builds the tokenizer (`build_tokenizer(args)`, which sets args.padded_vocab_size when unset); its
    `eod` is the end-of-document id batches should use.
    """
    config = gpt_dataset_config_from_args(args)
    cls = MockGPTDataset if config.mock else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(cls, list(num_samples), config).build()
    for name, ds, n in zip(("train", "valid", "test"), (train, valid, test), num_samples):
        if ds is not None:
            logger.info("%s dataset: %d samples (%s requested)", name, len(ds), n)
    return train, valid, test
