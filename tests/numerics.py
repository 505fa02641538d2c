"""The error measure of every numerics check: largest absolute difference over the reference's largest
magnitude, in float64."""
import numpy as np


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (inf when the shapes differ; 0 for two empty or all-zero arrays)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    return float(np.abs(got - want).max(initial=0.0) / scale)
