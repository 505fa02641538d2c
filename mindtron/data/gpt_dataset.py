"""GPT samples over an indexed dataset, indexed exactly as Megatron-Core's `GPTDataset`.

For one split of one `.bin/.idx` pair (a contiguous range of its sequences, the "documents" below):

1. tokens per epoch T = the split's token count; epochs E = the fewest whole epochs holding
   `num_samples x seq_length + 1` tokens (one epoch when num_samples is None);
2. the separate-last-epoch rule: with E > 1, if the last epoch contributes fewer than 80% of an epoch's
   samples, it is shuffled on its own and its samples are served after all others;
3. document index = the documents E times, shuffled by `numpy.random.RandomState(seed)`;
4. sample index = the start of every `seq_length + 1` token window over the concatenated documents
   (windows overlap by one token and cross document boundaries);
5. shuffle index = the serving order of the samples, from the same RandomState.

The three arrays are saved as .npy files under the cache directory (`--data-cache-path`, or
`<prefix>/cache/GPTDataset_indices` next to the data as Megatron does) and reused when the same data, split,
seed, sequence length and sample count come again. Items are `{"text": int64[seq_length + 1]}`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mindtron.data import helpers
from mindtron.data.indexed_dataset import IndexedDataset
from mindtron.data.utils import Blend, Split, parse_and_normalize_split, split_matrix_from_vector

logger = logging.getLogger("mindtron.data")

_THRESHOLD_SEPARATE_FINAL_EPOCH = 0.80


@dataclass
class GPTDatasetConfig:
    """What Megatron's `GPTDatasetConfig` holds: where the data is, how it is split and sampled."""

    random_seed: int
    """Seed of every shuffle (--seed)."""
    sequence_length: int
    """Tokens per sample, not counting the extra label token (--seq-length)."""
    blend: Optional[Blend] = None
    """(prefixes, weights or None) split by `split` (--data-path)."""
    blend_per_split: Optional[List[Optional[Blend]]] = None
    """One blend per split (--train-data-path / --valid-data-path / --test-data-path)."""
    split: Optional[str] = None
    """Train/valid/test proportions of each dataset's documents (--split)."""
    path_to_cache: Optional[str] = None
    """Directory for the cached index files (--data-cache-path); None: next to each dataset."""
    mmap_bin_files: bool = True
    """Memory-map the .bin files (--no-mmap-bin-files turns it off)."""
    mock: bool = False
    """Synthetic data (--mock-data); set automatically when there is no blend."""
    tokenizer: Any = None
    """The tokenizer (gives `eod`, and `vocab_size` to mock data)."""
    reset_position_ids: bool = False
    """--reset-position-ids (applied when batches are built)."""
    reset_attention_mask: bool = False
    """--reset-attention-mask (applied when batches are built)."""
    eod_mask_loss: bool = False
    """--eod-mask-loss (applied when batches are built)."""
    drop_last_partial_validation_sequence: bool = True
    """Drop the validation split's last, incomplete sample (else pad it with EOD)."""
    add_extra_token_to_sequence: bool = True
    """Samples hold seq_length + 1 tokens so inputs and shifted labels both have seq_length."""
    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples built per blended dataset."""
    split_matrix: Optional[List[Optional[Tuple[float, float]]]] = field(init=False, default=None)
    """Book-ends of each split, derived from `split`."""

    def __post_init__(self) -> None:
        if self.sequence_length is None or int(self.sequence_length) < 1:
            raise ValueError(f"--seq-length must be a positive integer, got {self.sequence_length}")
        if self.blend_per_split is not None and any(b is not None for b in self.blend_per_split):
            if self.blend is not None:
                raise ValueError("--data-path cannot be combined with --train-data-path / --valid-data-path / "
                                 "--test-data-path; use one or the other")
            if len(self.blend_per_split) != len(Split):
                raise ValueError(f"blend_per_split needs {len(Split)} entries (train, valid, test)")
            self.split = None
            return
        if self.blend is None:
            self.mock = True
        if self.mock:
            self.split = "1,1,1"  # Megatron splits mock data evenly whatever --split says
        if self.split is None:
            self.split = "969, 30, 1"
            logger.warning("--split not given with --data-path; using Megatron's legacy default '969, 30, 1'")
        self.split_matrix = split_matrix_from_vector(parse_and_normalize_split(self.split))


def tokenizer_description(tokenizer) -> Dict[str, Any]:
    """A JSON-able description of a tokenizer for cache keys."""
    if tokenizer is None:
        return {}
    describe = getattr(tokenizer, "unique_identifiers", None)
    if isinstance(describe, dict):
        return describe
    return {"class": type(tokenizer).__name__, "vocab_size": getattr(tokenizer, "vocab_size", None)}


class GPTDataset:
    """Samples of `seq_length + 1` tokens from one split of one indexed dataset (Megatron's GPTDataset)."""

    def __init__(self, indexed_dataset, dataset_path: Optional[str], indexed_indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: GPTDatasetConfig):
        self.dataset, self.dataset_path = indexed_dataset, dataset_path
        self.indices = np.asarray(indexed_indices, dtype=np.int32)
        self.num_samples, self.index_split, self.config = num_samples, index_split, config
        self.eod = int(getattr(config.tokenizer, "eod", 0) or 0) if config.tokenizer is not None else 0
        identifiers: Dict[str, Any] = {
            "class": type(self).__name__, "dataset_path": dataset_path, "num_samples": num_samples,
            "index_split": index_split.name, "random_seed": config.random_seed,
            "sequence_length": config.sequence_length, "split": config.split, "split_matrix": config.split_matrix,
            "tokenizer": tokenizer_description(config.tokenizer),
            "add_extra_token_to_sequence": config.add_extra_token_to_sequence,
            "drop_last_partial_validation_sequence": config.drop_last_partial_validation_sequence,
            # guards against a regenerated .bin/.idx under the same name reusing stale indices
            "sequence_count": int(len(indexed_dataset.sequence_lengths)),
            "token_count": int(np.asarray(indexed_dataset.sequence_lengths, dtype=np.int64).sum()),
        }
        self.unique_identifiers = identifiers
        self.unique_description = json.dumps(identifiers, indent=4, default=str)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8")).hexdigest()
        self.built_anew_on_cache_miss = False
        self.document_index, self.sample_index, self.shuffle_index = self._build_indices()

    # -- serving ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= int(idx) < len(self):
            raise IndexError(f"sample {idx} out of range for the {len(self)} samples of the "
                             f"{self.index_split.name} split of {self.dataset_path}")
        text, _ = self.query(int(idx))
        return {"text": text}

    def query(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        """(token ids int64 [seq_length + 1], ids of the documents they come from) of sample `idx`."""
        extra = int(self.config.add_extra_token_to_sequence)
        i = int(self.shuffle_index[idx])
        first, first_offset = (int(v) for v in self.sample_index[i])
        last, last_offset = (int(v) for v in self.sample_index[i + 1])
        docs, parts = [], []
        if first == last:
            doc = int(self.document_index[first])
            docs.append(doc)
            parts.append(self.dataset.get(doc, offset=first_offset, length=last_offset - first_offset + extra))
        else:
            for j in range(first, last + 1):
                doc = int(self.document_index[j])
                docs.append(doc)
                offset = first_offset if j == first else 0
                length = last_offset + extra if j == last else None
                parts.append(self.dataset.get(doc, offset=offset, length=length))
        want = self.config.sequence_length + extra
        have = sum(len(p) for p in parts)
        if have < want:  # only the kept partial validation sample
            parts.append(np.full(want - have, self.eod, np.int64))
        return np.concatenate(parts).astype(np.int64, copy=False), np.asarray(docs, np.int64)

    # -- index building -------------------------------------------------------------------------------
    def _cache_dir(self) -> Optional[str]:
        if self.config.path_to_cache:
            return self.config.path_to_cache
        if self.config.mock or self.dataset_path is None:
            return None
        return os.path.join(self.dataset_path, "cache", f"{type(self).__name__}_indices")

    def _build_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        cache = self._cache_dir()
        paths = None
        if cache:
            base = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-"
                                       f"{self.index_split.name}")
            paths = {k: f"{base}-{k}" for k in ("description.txt", "document_index.npy", "sample_index.npy",
                                                  "shuffle_index.npy")}
            if all(os.path.isfile(p) for p in paths.values()):
                try:
                    loaded = tuple(np.load(paths[k], mmap_mode="r") for k in
                                   ("document_index.npy", "sample_index.npy", "shuffle_index.npy"))
                    logger.info("loaded %s %s indices from %s", type(self).__name__, self.index_split.name, cache)
                    return loaded
                except (OSError, ValueError):
                    logger.warning("cached indices under %s are unreadable; rebuilding them", cache)
        start = time.time()
        arrays = self._compute_indices()
        self.built_anew_on_cache_miss = True
        logger.info("built %s %s indices (%d samples) in %.3f s", type(self).__name__, self.index_split.name,
                    arrays[1].shape[0] - 1, time.time() - start)
        if paths:
            try:
                _save_atomically(paths, self.unique_description, arrays)
            except OSError as err:
                logger.warning("could not cache dataset indices under %s (%s); pass a writable "
                               "--data-cache-path to reuse them between runs", cache, err)
        return arrays

    def _compute_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        seq, extra = int(cfg.sequence_length), int(cfg.add_extra_token_to_sequence)
        sizes = np.asarray(self.dataset.sequence_lengths)
        tokens_per_epoch = int(sizes[self.indices].astype(np.int64).sum()) if len(self.indices) else 0
        where = f"the {self.index_split.name} split of {self.dataset_path or 'the mock data'}"
        if tokens_per_epoch <= extra:
            if self.num_samples:
                raise ValueError(
                    f"{where} is empty: --split {cfg.split!r} gives it {len(self.indices)} of "
                    f"{len(sizes)} documents ({tokens_per_epoch} tokens) but {self.num_samples} samples are "
                    "needed. Give this split a larger share in --split, use more data, or set the iterations "
                    "that read it (--eval-iters / --train-iters) to 0")
            return (np.zeros(0, np.int32), np.zeros((1, 2), np.int32), np.zeros(0, np.uint32))
        num_epochs = self._num_epochs(tokens_per_epoch)
        separate = False
        if num_epochs > 1:
            before_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq
            from_final = self.num_samples - before_final
            per_epoch = (tokens_per_epoch - extra) // seq
            if not 0 <= from_final <= per_epoch + 1:
                raise RuntimeError(f"inconsistent epoch arithmetic for {where}")
            separate = from_final < int(_THRESHOLD_SEPARATE_FINAL_EPOCH * per_epoch)
        rng = np.random.RandomState(cfg.random_seed)
        document_index = helpers.build_document_index(self.indices, num_epochs, rng, separate)
        drop_last = True
        if self.index_split == Split.valid:
            drop_last = cfg.drop_last_partial_validation_sequence
        sample_index = helpers.build_sample_index(sizes, document_index, seq, num_epochs, tokens_per_epoch,
                                                  drop_last, bool(extra))
        total = sample_index.shape[0] - 1
        if separate:
            shuffle_index = helpers.build_shuffle_index(before_final, total, rng)
        else:
            shuffle_index = helpers.build_shuffle_index(total, total, rng)
        return document_index, sample_index, shuffle_index

    def _num_epochs(self, tokens_per_epoch: int) -> int:
        if self.num_samples is None:
            return 1
        needed = self.num_samples * self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
        return max(1, -(-needed // tokens_per_epoch))


def _save_atomically(paths: Dict[str, str], description: str, arrays) -> None:
    """Write the index files through temporary names, the description last: a reader sees either all
    four files complete or a cache miss, even with several ranks writing at once."""
    folder = os.path.dirname(paths["description.txt"])
    os.makedirs(folder, exist_ok=True)
    tag = f".tmp{os.getpid()}"
    for key, array in zip(("document_index.npy", "sample_index.npy", "shuffle_index.npy"), arrays):
        tmp = paths[key] + tag + ".npy"
        np.save(tmp, np.asarray(array), allow_pickle=False)
        os.replace(tmp, paths[key])
    tmp = paths["description.txt"] + tag
    with open(tmp, "wt", encoding="utf-8") as f:
        f.write(description)
    os.replace(tmp, paths["description.txt"])


def build_indexed_dataset(path_prefix: str, config: GPTDatasetConfig) -> IndexedDataset:
    """Open `prefix.bin/.idx` for a GPT dataset."""
    return IndexedDataset(path_prefix, multimodal=False, mmap=config.mmap_bin_files)


# --------------------------------------------------------------------------------------------------------
# Mock data (Megatron's MockGPTLowLevelDataset / MockGPTDataset)
# --------------------------------------------------------------------------------------------------------
class MockGPTLowLevelDataset:
    """100000 synthetic documents: document i is [1, 2, ..., n_i - 1, eod] with n_i drawn from
    `numpy.random.default_rng(0)` in [1, 4096) (Megatron's mock data).

    When the vocabulary is too small for ids up to 4094, ids count through [1, vocab_size) instead,
    skipping the EOD id, so every token is valid for the model.
    """

    seed: int = 0
    size: int = 100000
    max_sequence_length: int = 4096

    def __init__(self, eod: int, vocab_size: Optional[int] = None):
        self.eod = int(eod)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        if self.vocab_size is not None and self.vocab_size < 3:
            raise ValueError(f"--mock-data needs a vocabulary of at least 3 ids, got {self.vocab_size}")
        rng = np.random.default_rng(seed=self.seed)
        self.sequence_lengths = rng.integers(low=1, high=self.max_sequence_length, size=self.size, dtype=np.int32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        length = int(self.sequence_lengths[idx])
        body = np.arange(length - 1, dtype=np.int64)
        if self.vocab_size is None:
            ids = body + 1
        else:
            ids = 1 + body % (self.vocab_size - 2)
            if self.eod >= 1:
                ids += ids >= self.eod
        return np.concatenate([ids, [self.eod]]).astype(np.int64)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document `idx`."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self[idx][offset:offset + length]


class MockGPTDataset(GPTDataset):
    """GPTDataset over `MockGPTLowLevelDataset` (never cached)."""

    def __init__(self, dataset: MockGPTLowLevelDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: GPTDatasetConfig):
        if not config.mock:
            raise ValueError("MockGPTDataset needs a config with mock=True")
        super().__init__(dataset, None, indices, num_samples, index_split, config)


def build_mock_low_level_dataset(config: GPTDatasetConfig) -> MockGPTLowLevelDataset:
    """Megatron's mock documents for the config's tokenizer."""
    tok = config.tokenizer
    eod = int(getattr(tok, "eod", 0)) if tok is not None else 0
    vocab = getattr(tok, "vocab_size", None) if tok is not None else None
    if vocab is not None and vocab > MockGPTLowLevelDataset.max_sequence_length - 1 and not (1 <= eod <= 4094):
        vocab = None  # every id of Megatron's mock documents is valid: use them unchanged
    return MockGPTLowLevelDataset(eod, vocab)
