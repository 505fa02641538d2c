"""Reading a saved iteration whose experts were spread over another number of expert-parallel ranks.

Each `mp_rank_*` directory of an iteration holds the dense weights of its tensor (and pipeline) rank and
the experts of its expert-parallel rank, stacked [local experts, ...]. `SavedIteration` finds, for this
rank, a directory with its dense weights and assembles any expert tensor (a weight, or an optimizer slot
keyed "<slot>.<parameter name>") from the directories of all saved expert-parallel ranks, then keeps this
rank's experts. Expert weights split over expert tensor-parallel ranks are matched shard by shard, so the
expert tensor-parallel size must stay the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
from safetensors import safe_open

from mindtron.parallel_core import parallel_state as ps


class SavedIteration:
    """The directories of one saved iteration (`layout` is the saved meta.json's layout)."""

    def __init__(self, directory: Path, layout: dict):
        self.directory, self.layout = Path(directory), layout
        pp, ep = layout["pp"], layout.get("ep", 1)
        self.etp = layout.get("etp", layout["tp"])
        self.dirs: Dict[Tuple[int, int, int, int], Path] = {}
        for d in sorted(self.directory.glob("mp_rank_*")):
            if not d.is_dir() or d.suffix in (".tmp", ".old"):
                continue
            name, etp_rank = d.name, 0
            if "_etp" in name:
                name, etp_part = name.split("_etp")
                etp_rank = int(etp_part)
            key = _parse(name, pp, ep)
            if key is not None:
                self.dirs[key + (etp_rank,)] = d

    def _etp_rank_of(self, key) -> int:
        tp_rank, _, _, etp_rank = key
        if self.etp == 1:
            return 0
        return tp_rank if self.etp == self.layout["tp"] else etp_rank

    def dense_dir(self) -> Path:
        """A directory holding this rank's dense weights (same tensor and pipeline rank)."""
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        for key, d in self.dirs.items():
            if key[0] == tp_rank and key[1] == pp_rank:
                return d
        raise FileNotFoundError(f"{self.directory} has no directory for tensor rank {tp_rank}, pipeline rank "
                                f"{pp_rank}: it was saved with another tensor or pipeline parallel size")

    def pipeline_dirs(self) -> List[Path]:
        """Every directory of this rank's pipeline stage."""
        pp_rank = ps.get_pipeline_model_parallel_rank()
        return [d for key, d in self.dirs.items() if key[1] == pp_rank]

    def expert_sources(self) -> List[Path]:
        """For each saved expert-parallel rank in order, a directory with this rank's expert tensor-parallel shard."""
        layout = ps.get_layout()
        if self.etp != layout.etp:
            raise ValueError(f"{self.directory} was saved with expert tensor-parallel size {self.etp}, this run uses "
                             f"{layout.etp}; keep --expert-tensor-parallel-size to load it")
        pp_rank, etp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
        sources = []
        for r in range(self.layout.get("ep", 1)):
            found = [d for key, d in self.dirs.items()
                     if key[1] == pp_rank and key[2] == r and self._etp_rank_of(key) == etp_rank]
            if not found:
                raise FileNotFoundError(f"{self.directory} has no directory with the experts of expert-parallel rank "
                                        f"{r} (pipeline rank {pp_rank}): the checkpoint is incomplete")
            sources.append(found[0])
        return sources

    def read(self, filename: str, expert_names: Set[str], keys: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
        """The tensors of `filename` as this rank needs them: dense ones from its dense directory, expert ones
        (key or key minus its "<slot>." prefix in `expert_names`) assembled over the saved expert-parallel
        ranks and cut to this rank's experts."""
        dense_path = self.dense_dir() / filename
        if not dense_path.exists():
            raise FileNotFoundError(f"{dense_path} is missing")
        out: Dict[str, np.ndarray] = {}
        expert_keys = []
        with safe_open(str(dense_path), framework="numpy") as handle:
            for key in (handle.keys() if keys is None else keys):
                if _param_of(key, expert_names) is not None:
                    expert_keys.append(key)
                elif key in handle.keys():
                    out[key] = handle.get_tensor(key)
        if expert_keys:
            stacks: Dict[str, List[np.ndarray]] = {k: [] for k in expert_keys}
            for source in self.expert_sources():
                with safe_open(str(source / filename), framework="numpy") as handle:
                    for key in expert_keys:
                        stacks[key].append(handle.get_tensor(key))
            ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
            for key, parts in stacks.items():
                full = np.concatenate(parts, axis=0)  # [experts, ...] in global order
                out[key] = np.split(full, ep, axis=0)[ep_rank]
        return out


def _param_of(key: str, names: Set[str]) -> Optional[str]:
    if key in names:
        return key
    rest = key.partition(".")[2]
    return rest if rest in names else None


def _parse(name: str, pp_size: int, ep_size: int) -> Optional[Tuple[int, int, int]]:
    parts = name.split("_")[2:]
    want = 1 + (pp_size > 1) + (ep_size > 1)
    if not name.startswith("mp_rank_") or len(parts) != want or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]) if pp_size > 1 else 0, int(parts[-1]) if ep_size > 1 else 0
