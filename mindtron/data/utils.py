"""Small shared pieces of the data pipeline: split names, `--split` parsing and `--data-path` blends.

These follow Megatron-Core's conventions so that the same flags give the same document ranges:
- `--split "969,30,1"` is a list of non-negative numbers (anything that is not a digit or a dot separates
  them), padded with zeros to three entries and normalised to fractions of the documents;
- the fractions become book-ends [(0, a), (a, a + b), (a + b, 1)], a zero-width range meaning "no dataset
  for that split";
- `--data-path` is either prefixes (`A B C`) or weight/prefix pairs (`0.3 A 0.7 B`).
"""
from __future__ import annotations

import enum
import logging
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("mindtron.data")

Blend = Tuple[List[str], Optional[List[float]]]
"""(prefixes, weights or None), Megatron's `blend` value."""


class Split(enum.Enum):
    """The three dataset splits, in Megatron's order."""

    train = 0
    valid = 1
    test = 2


def normalize(weights: Sequence[float]) -> List[float]:
    """Weights divided by their sum (float64 arithmetic, like Megatron), as a list."""
    values = np.asarray(weights, dtype=np.float64)
    return (values / values.sum()).tolist()


def parse_and_normalize_split(split: str) -> List[float]:
    """`--split` text such as "969, 30, 1" or "99,1" -> three fractions summing to one."""
    if not isinstance(split, str):
        raise ValueError(f"--split must be a string such as '969,30,1', got {split!r}")
    numbers = [float(x) for x in re.findall(r"[.0-9]+", split)] if split else []
    if not numbers:
        raise ValueError(f"--split {split!r} has no numbers; give train,valid,test proportions such as "
                         "'969,30,1'")
    if len(numbers) > len(Split):
        raise ValueError(f"--split {split!r} has {len(numbers)} parts; give at most three (train,valid,test)")
    numbers += [0.0] * (len(Split) - len(numbers))
    if sum(numbers) <= 0:
        raise ValueError(f"--split {split!r} gives every split zero weight; give at least one positive part, "
                         "e.g. '969,30,1'")
    return normalize(numbers)


def split_matrix_from_vector(fractions: Sequence[float]) -> List[Optional[Tuple[float, float]]]:
    """Normalised split fractions -> per split (begin, end) book-ends, None where a split is empty.

    The running sums are accumulated left to right one addition at a time, so the book-ends carry the same
    floating-point values as Megatron's.
    """
    edges = [0.0]
    for f in fractions:
        edges.append(edges[-1] + f)
    matrix: List[Optional[Tuple[float, float]]] = []
    for begin, end in zip(edges[:-1], edges[1:]):
        matrix.append((begin, end) if end > begin else None)
    return matrix


def split_document_range(bookend: Tuple[float, float], num_elements: int) -> Tuple[int, int]:
    """The [begin, end) element range a split's book-ends select (Python rounding, as Megatron)."""
    return int(round(bookend[0] * float(num_elements))), int(round(bookend[1] * float(num_elements)))


def _as_weight(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def get_blend_from_list(items: Optional[Sequence[str]], flag: str = "--data-path") -> Optional[Blend]:
    """`--data-path`-style list -> (prefixes, weights or None).

    An odd-length list, or an even-length list whose would-be weights are not all numbers, is a list of
    prefixes. Weights must be non-negative, not all zero; a zero weight is rejected because the dataset it
    names would be built and never read (drop the prefix instead).
    """
    if items is None:
        return None
    if isinstance(items, str):
        items = items.split()
    items = [str(x) for x in items]
    if not items:
        raise ValueError(f"{flag} is empty; give dataset prefixes (without .bin/.idx), optionally weighted: "
                         f"{flag} 0.3 data/a_text_document 0.7 data/b_text_document")
    weights: Optional[List[float]] = None
    prefixes = items
    if len(items) % 2 == 0:
        candidates = [_as_weight(x) for x in items[0::2]]
        if all(w is not None for w in candidates):
            weights, prefixes = candidates, items[1::2]
        elif any(w is not None for w in candidates) and all(_as_weight(p) is None for p in items[1::2]):
            bad = [items[i] for i in range(0, len(items), 2) if _as_weight(items[i]) is None]
            raise ValueError(f"{flag} mixes weights and prefixes: {bad} are not numbers. Give either only "
                             f"prefixes or 'weight prefix' pairs, e.g. {flag} 0.3 A 0.7 B")
    elif any(_as_weight(x) is not None for x in items[0::2]) and len(items) > 1:
        raise ValueError(f"{flag} has an odd number of entries ({len(items)}) but starts with a weight; give "
                         f"'weight prefix' pairs, e.g. {flag} 0.3 A 0.7 B")
    prefixes = [p.strip() for p in prefixes]
    if weights is not None:
        if any(not np.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"{flag} weights must be finite and non-negative, got {weights}")
        if sum(weights) <= 0:
            raise ValueError(f"{flag} weights {weights} do not sum to a positive value; give each dataset a "
                             "positive weight")
        if any(w == 0 for w in weights):
            zero = [p for p, w in zip(prefixes, weights) if w == 0]
            raise ValueError(f"{flag} gives weight 0 to {zero}; remove those prefixes instead")
    for p in prefixes:
        if p.endswith(".bin") or p.endswith(".idx"):
            raise ValueError(f"{flag} entry {p!r} ends in {p[-4:]}; give the prefix without the suffix, "
                             f"e.g. {p[:-4]}")
    return prefixes, weights


def get_blend_and_blend_per_split(args) -> Tuple[Optional[Blend], Optional[List[Optional[Blend]]]]:
    """Megatron's rule: `--data-path` (or `--data-args-path`) gives one blend split by `--split`;
    otherwise `--train/valid/test-data-path` (or `--per-split-data-args-path`) give one blend per split."""
    data_path = getattr(args, "data_path", None)
    data_args_path = getattr(args, "data_args_path", None)
    per_split_args_path = getattr(args, "per_split_data_args_path", None)
    per_split = [getattr(args, f"{s}_data_path", None) for s in ("train", "valid", "test")]
    use_data_path = data_path is not None or data_args_path is not None
    if use_data_path and (any(p is not None for p in per_split) or per_split_args_path):
        raise ValueError("give either --data-path (split by --split) or --train-data-path / --valid-data-path / "
                         "--test-data-path, not both")
    if use_data_path:
        if data_path is not None and data_args_path is not None:
            raise ValueError("give either --data-path or --data-args-path, not both")
        if data_args_path:
            with open(data_args_path, "r", encoding="utf-8") as f:
                return get_blend_from_list(f.read().split(), "--data-args-path"), None
        return get_blend_from_list(data_path), None
    if any(p is not None for p in per_split) or per_split_args_path:
        if per_split_args_path:
            import json
            with open(per_split_args_path, "r", encoding="utf-8") as f:
                spec = json.load(f)
            per_split = [spec.get(s) for s in ("train", "valid", "test")]
            flags = ["--per-split-data-args-path"] * 3
        else:
            flags = ["--train-data-path", "--valid-data-path", "--test-data-path"]
        return None, [get_blend_from_list(p, f) for p, f in zip(per_split, flags)]
    return None, None
