"""Weighted mixtures of datasets (`--data-path 0.3 A 0.7 B`), indexed as Megatron-Core's `BlendedDataset`.

Sample s of the blend comes from the dataset that is furthest behind its weighted share after s samples
(see `helpers.build_blending_indices`), and within each dataset samples are taken in that dataset's own
order. The two index arrays are cached under `--data-cache-path` when one is given.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from mindtron.data import helpers
from mindtron.data.utils import normalize

logger = logging.getLogger("mindtron.data")


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights`; with size None, exactly weights[i]
    (integers) samples from dataset i. Items are the member's item plus "dataset_id"."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[Union[int, float]], size: Optional[int],
                 config: Any):
        if len(datasets) != len(weights):
            raise ValueError(f"a blend needs one weight per dataset ({len(datasets)} datasets, {len(weights)} "
                             "weights)")
        if not datasets:
            raise ValueError("a blend needs at least one dataset")
        if len(datasets) >= 32767:
            raise ValueError("a blend holds at most 32766 datasets")
        if any(not w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        if size is None and any(float(w) != int(w) for w in weights):
            raise ValueError("an exhaustive blend (no size) needs integer sample counts as weights")
        if len(datasets) == 1:
            logger.warning("building a BlendedDataset for a single dataset")
        self.datasets = list(datasets)
        self.split = getattr(self.datasets[0], "index_split", None)
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        self.size = size
        self.config = config
        identifiers: Dict[str, Any] = {
            "class": type(self).__name__,
            "datasets": [getattr(d, "unique_identifiers", repr(d)) for d in self.datasets],
            "split": getattr(self.split, "name", None), "weights": self.weights, "size": self.size,
        }
        self.unique_description = json.dumps(identifiers, indent=4, default=str)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8")).hexdigest()
        self.dataset_index, self.dataset_sample_index = self._build_indices()

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if not 0 <= int(idx) < len(self):
            raise IndexError(f"sample {idx} out of range for a blend of {len(self)} samples")
        which = int(self.dataset_index[idx])
        item = self.datasets[which][int(self.dataset_sample_index[idx])]
        return {"dataset_id": which, **item}

    def _build_indices(self):
        cache = getattr(self.config, "path_to_cache", None)
        paths = None
        if cache:
            base = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-"
                                       f"{getattr(self.split, 'name', 'none')}")
            paths = {k: f"{base}-{k}" for k in ("description.txt", "dataset_index.npy", "dataset_sample_index.npy")}
            if all(os.path.isfile(p) for p in paths.values()):
                try:
                    return (np.load(paths["dataset_index.npy"], mmap_mode="r"),
                            np.load(paths["dataset_sample_index.npy"], mmap_mode="r"))
                except (OSError, ValueError):
                    logger.warning("cached blend indices under %s are unreadable; rebuilding them", cache)
        if self.size is not None:
            dataset_index, sample_index = helpers.build_blending_indices(self.weights, self.size)
        else:
            dataset_index, sample_index = helpers.build_exhaustive_blending_indices(self.weights)
        counts = np.bincount(dataset_index.astype(np.int64), minlength=len(self.datasets))
        for i, (count, ds) in enumerate(zip(counts, self.datasets)):
            if count > len(ds):
                raise ValueError(
                    f"the {getattr(self.split, 'name', '')} blend asks dataset {i} "
                    f"({getattr(ds, 'dataset_path', type(ds).__name__)}) for {count} samples but it has "
                    f"{len(ds)}; raise mid_level_dataset_surplus "
                    f"(now {getattr(self.config, 'mid_level_dataset_surplus', None)})")
        if paths:
            try:
                os.makedirs(cache, exist_ok=True)
                tag = f".tmp{os.getpid()}"
                for key, array in (("dataset_index.npy", dataset_index), ("dataset_sample_index.npy", sample_index)):
                    np.save(paths[key] + tag + ".npy", array, allow_pickle=False)
                    os.replace(paths[key] + tag + ".npy", paths[key])
                with open(paths["description.txt"] + tag, "wt", encoding="utf-8") as f:
                    f.write(self.unique_description)
                os.replace(paths["description.txt"] + tag, paths["description.txt"])
            except OSError as err:
                logger.warning("could not cache blend indices under %s (%s)", cache, err)
        return dataset_index, sample_index


def sizes_per_dataset(normalized_weights: List[float], target_size_per_split: List[Optional[int]],
                      surplus: float = 0.0) -> List[List[Optional[int]]]:
    """Samples to take (surplus 0) or build (surplus > 0) from each dataset for each split:
    ceil(ceil(target x weight) x (1 + surplus)), Megatron's rule."""
    import math
    if not np.isclose(sum(normalized_weights), 1.0):
        raise ValueError(f"weights {normalized_weights} are not normalised")
    return [[None if target is None else int(math.ceil(math.ceil(target * w) * (1 + surplus)))
             for target in target_size_per_split] for w in normalized_weights]
