"""Reproducible randomness for model-parallel dropout.

MindSpore cannot fork and restore the state behind `ops.dropout`, so mindtron draws dropout masks itself
from named numpy generators whose state can be saved, restored and switched. As in Megatron:

- the default generator is seeded with the data-parallel seed (`seed`), identical on all tensor-parallel
  ranks, for dropout on replicated activations;
- "model-parallel-rng" is seeded with `seed + 2718 + tp_rank`, different per tensor-parallel rank, for
  dropout on split activations (entered with `get_rng_tracker().fork()`);
- "expert-parallel-rng" is seeded with `seed + 1024 + 100 x ep_rank + tp_rank` for expert layers.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

DEFAULT_RNG = "default"
MODEL_PARALLEL_RNG = "model-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"


class RNGStatesTracker:
    """Named numpy generators; `fork(name)` makes one the active source of dropout masks."""

    def __init__(self) -> None:
        self._generators: Dict[str, np.random.Generator] = {}
        self._seeds: Dict[str, int] = {}
        self._active = DEFAULT_RNG
        self.add(DEFAULT_RNG, 0)

    def reset(self) -> None:
        """Forget every generator (the default one is re-made with seed 0)."""
        self.__init__()

    def add(self, name: str, seed: int) -> None:
        """Register generator `name`; two generators may not share a seed (their masks would repeat)."""
        if name != DEFAULT_RNG:
            if name in self._generators:
                raise ValueError(f"RNG state {name!r} already exists")
            if seed in {s for n, s in self._seeds.items() if n != DEFAULT_RNG}:
                raise ValueError(f"seed {seed} is already used by another RNG state")
        self._generators[name] = np.random.default_rng(seed)
        self._seeds[name] = seed

    def get_states(self) -> Dict[str, dict]:
        """Every generator's state, for checkpoints."""
        return {name: gen.bit_generator.state for name, gen in self._generators.items()}

    def set_states(self, states: Dict[str, dict]) -> None:
        """Restore states saved by get_states()."""
        for name, state in states.items():
            gen = self._generators.setdefault(name, np.random.default_rng())
            gen.bit_generator.state = state

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draw from generator `name` inside the block, then return to the previous one."""
        if name not in self._generators:
            raise KeyError(f"RNG state {name!r} is not added; call model_parallel_seed() first")
        previous, self._active = self._active, name
        try:
            yield
        finally:
            self._active = previous

    @property
    def active(self) -> np.random.Generator:
        """The generator masks are drawn from now."""
        return self._generators[self._active]


_TRACKER = RNGStatesTracker()
_SEED = {"global": 1234}  # Megatron's --seed default until model_parallel_seed() is called


def initial_seed() -> int:
    """The global seed of the last model_parallel_seed() call (parameter initialisation draws from it)."""
    return _SEED["global"]


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (Megatron: get_cuda_rng_tracker)."""
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: Optional[int] = None, ep_rank: Optional[int] = None) -> None:
    """Seed MindSpore, numpy and the tracker for this rank (Megatron: model_parallel_cuda_manual_seed).

    Ranks default to this rank's tensor- and expert-parallel indices from parallel_state (0 before it is
    initialized).
    """
    from mindtron.parallel_core import parallel_state as ps

    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    if ep_rank is None:
        ep_rank = ps.get_expert_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    offset = seed + 2718
    _SEED["global"] = int(seed)
    ms.set_seed(seed)
    np.random.seed(seed)
    _TRACKER.reset()
    _TRACKER.add(DEFAULT_RNG, seed)
    _TRACKER.add(MODEL_PARALLEL_RNG, offset + tp_rank)
    _TRACKER.add(EXPERT_PARALLEL_RNG, seed + 1024 + 100 * ep_rank + tp_rank)


_FORWARD_DEPTH = [0]


@contextlib.contextmanager
def forward_pass():
    """Marks a model's forward pass; a recomputed cell that runs outside one is being recomputed."""
    _FORWARD_DEPTH[0] += 1
    try:
        yield
    finally:
        _FORWARD_DEPTH[0] -= 1


def in_forward_pass() -> bool:
    """Whether a model's forward pass is running (False during a recompute pass or outside any model)."""
    return _FORWARD_DEPTH[0] > 0


class RngReplay:
    """Gives a recomputed cell the same dropout masks on its recompute pass as on its forward pass.

    MindSpore recomputes by running the cell's Python forward again, which would draw new masks. The
    forward records the tracker's states under its input's buffer address (the recompute pass receives
    the same saved buffer); the recompute restores them, runs, and puts the streams back.
    """

    def __init__(self, capacity: int = 4096):
        self._states: "collections.OrderedDict[int, dict]" = collections.OrderedDict()
        self._capacity = capacity

    def __call__(self, fn, x: Tensor, *args):
        key = x.data_ptr()
        if _FORWARD_DEPTH[0] > 0:
            self._states[key] = _TRACKER.get_states()
            self._states.move_to_end(key)
            while len(self._states) > self._capacity:  # forwards that never saw a backward
                self._states.popitem(last=False)
            return fn(x, *args)
        saved = self._states.pop(key, None)
        if saved is None:
            raise RuntimeError("a recomputed cell ran outside a forward pass with no recorded forward to replay; "
                               "call the model inside tensor_parallel.forward_pass()")
        now = _TRACKER.get_states()
        _TRACKER.set_states(saved)
        try:
            return fn(x, *args)
        finally:
            _TRACKER.set_states(now)


def dropout_mask(shape, p: float, dtype=ms.float32) -> Tensor:
    """The factor inverted dropout multiplies by: 0 where dropped, 1 / (1 - p) where kept, drawn from the
    tracker's active generator. Drawing the mask apart from applying it lets a compiled layer take it as
    an input (masks drawn inside a compiled graph would be frozen at compile time)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = _TRACKER.active.random(tuple(shape), dtype=np.float32) >= p
    return Tensor(keep.astype(np.float32) / (1.0 - p), dtype)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout with a mask from the tracker's active generator (identity when p == 0 or eval)."""
    if not training or p == 0.0:
        return x
    return x * dropout_mask(x.shape, p, x.dtype)
