"""Megatron `torch_dist` checkpoints for the converter tests, written by PyTorch's own
torch.distributed.checkpoint (DCP) the way Megatron-Core 0.19 writes them, by code written here from the
format's description (independent of mindtron.convert):

- every per-layer tensor under one key without the layer index, global shape [num_layers, ...]; each rank
  writes, for each of its layers, its tensor-parallel piece as a chunk with global offsets (QKV rows,
  SwiGLU's gate rows and up rows as two chunks, row-parallel columns, vocabulary rows); replicated tensors
  are written by tensor rank 0 only; experts stacked [num_layers, experts, ...] and split by expert rank;
- norms under the fused-norm names, `common_state/shard_0_1` holding torch.save([{"args", "iteration",
  "checkpoint_version", ...}]) (or `common.pt` as Megatron-Core <= 0.18 writes it), `_extra_state` objects
  holding torch.save([None]), `metadata.json` and the tracker file.

Ranks write through a tensor subclass implementing DCP's checkpointable protocol (a list of local chunks,
as Megatron's own container does). `write_single` writes in one process (no process group);
`spawn_writers` runs `write_on_rank` in 2 processes joined by a gloo process group on 127.0.0.1.
This module imports only numpy and torch, so the spawned writers start quickly.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
TE_MODULES = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
              "mlp.linear_fc1", "mlp.linear_fc2")
Piece = Tuple[Tuple[int, ...], np.ndarray]  # (global offsets, values)


class LocalChunks(torch.Tensor):
    """A global tensor of which this rank holds some chunks (DCP's checkpointable protocol)."""

    @staticmethod
    def __new__(cls, shape, pieces, dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype)

    def __init__(self, shape, pieces: List[Piece], dtype=torch.float32):
        self.global_shape = torch.Size(shape)
        self.pieces = [(torch.Size(offsets), values if isinstance(values, torch.Tensor) else
                        torch.from_numpy(np.ascontiguousarray(values)).to(dtype)) for offsets, values in pieces]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{cls.__name__} holds chunks for saving only ({func})")

    def __create_write_items__(self, fqn, obj, index=None):
        return [WriteItem(index=MetadataIndex(fqn, offsets, i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=values.size()),
                                                      properties=TensorProperties.create_from_tensor(values),
                                                      size=self.global_shape))
                for i, (offsets, values) in enumerate(self.pieces)]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=offsets, sizes=values.size()) for offsets, values in self.pieces]

    def __get_tensor_shard__(self, index):
        for offsets, values in self.pieces:
            if offsets == index.offset:
                return values
        raise ValueError(f"no chunk of {index.fqn} at {index.offset}")


class ObjectsAsBytes(DefaultSavePlanner):
    """Megatron's planner behaviour for objects: they arrive as torch.save'd bytes and are written as they are."""

    def transform_object(self, write_item, object):
        return object


def saved_bytes(obj) -> io.BytesIO:
    """torch.save(obj) in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------------------------------------
# Which chunks a rank writes
# --------------------------------------------------------------------------------------------------------
def _tp_pieces(key: str, array: np.ndarray, tp: int, rank: int, swiglu: bool) -> List[Piece]:
    """The tensor-parallel pieces of whole tensor `key` that tensor rank `rank` writes (offsets in `array`)."""
    zero = (0,) * array.ndim
    if key.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")) or \
            (key.endswith(("linear_fc1.weight", "linear_fc1.bias")) and not swiglu):
        rows = array.shape[0] // tp
        return [((rank * rows,) + zero[1:], array[rank * rows:(rank + 1) * rows])]
    if key.endswith(("linear_fc1.weight", "linear_fc1.bias")):  # [gate; up]: a quarter of each per rank of 2
        half = array.shape[0] // 2
        rows = half // tp
        return [((start + rank * rows,) + zero[1:], array[start + rank * rows:start + (rank + 1) * rows])
                for start in (0, half)]
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        cols = array.shape[1] // tp
        return [((0, rank * cols) + zero[2:], array[:, rank * cols:(rank + 1) * cols])]
    return [(zero, array)] if rank == 0 else []  # replicated: the main replica only


def rank_state(whole: Dict[str, np.ndarray], num_layers: int, tp: int, pp: int, tp_rank: int, pp_rank: int,
               swiglu: bool, common: bytes = None, extra_state: bool = True, dtype=torch.float32) -> dict:
    """The sharded state dict of one (tensor, pipeline) rank. `whole` maps per-layer Megatron-Core keys (global
    layer numbers, fused norm names) to whole tensors, saved as `dtype`; `common` is torch.save([common
    state]) (rank 0)."""
    per_stage = num_layers // pp
    mine = range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
    chunks: Dict[str, List[Piece]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for key, array in whole.items():
        match = LAYER_KEY.match(key)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            if layer not in mine:
                continue
            stacked = f"decoder.layers.{rest}"
            shapes[stacked] = (num_layers,) + array.shape
            pieces = [((layer,) + off, values[None]) for off, values in _tp_pieces(key, array, tp, tp_rank, swiglu)]
        else:
            if key.startswith("embedding.") and pp_rank != 0 or not key.startswith("embedding.") and pp_rank != pp - 1:
                continue
            stacked, shapes[key] = key, array.shape
            pieces = _tp_pieces(key, array, tp, tp_rank, swiglu)
        chunks.setdefault(stacked, []).extend(pieces)
    state: dict = {key: LocalChunks(shapes[key], pieces, dtype) for key, pieces in chunks.items() if pieces}
    if common is not None:
        state["common_state/shard_0_1"] = io.BytesIO(common)
    if extra_state and tp_rank == 0:
        for module in TE_MODULES:
            for layer in mine:
                state[f"decoder.layers.{module}._extra_state/shard_{layer}_{num_layers}"] = saved_bytes([None])
    return state


def moe_rank_state(experts: Dict[str, np.ndarray], ep: int, ep_rank: int) -> dict:
    """Expert-parallel rank `ep_rank`'s chunks of stacked expert tensors [L, E, ...]: one chunk per (layer,
    expert) it holds; other stacked tensors ([L, ...], router and shared experts) by expert rank 0."""
    state = {}
    for key, array in experts.items():
        if ".mlp.experts.experts." in key:
            local = array.shape[1] // ep
            pieces = [((layer, expert) + (0,) * (array.ndim - 2), array[layer:layer + 1, expert:expert + 1])
                      for layer in range(array.shape[0]) for expert in range(ep_rank * local, (ep_rank + 1) * local)]
        else:
            pieces = [((layer,) + (0,) * (array.ndim - 1), array[layer:layer + 1]) for layer in range(array.shape[0])
                      ] if ep_rank == 0 else []
        if pieces:
            state[key] = LocalChunks(array.shape, pieces)
    return state


def merge_states(states: List[dict]) -> dict:
    """Several ranks' state dicts as one process's (a single process writing every chunk)."""
    merged: dict = {}
    for state in states:
        for key, value in state.items():
            if isinstance(value, LocalChunks) and key in merged:
                old = merged[key]
                merged[key] = LocalChunks(old.global_shape, old.pieces + value.pieces, old.dtype)
            else:
                merged.setdefault(key, value)
    return merged


def save(directory: Path, state: dict, iteration: int, legacy_common: bytes = None) -> None:
    """DCP save of `state` into directory (collectively when a process group exists), then what Megatron adds
    on rank 0: metadata.json, common.pt for Megatron-Core <= 0.18 (`legacy_common`), the tracker file."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(directory), planner=ObjectsAsBytes(flatten_state_dict=False),
                 no_dist=not dist.is_initialized())
    if rank == 0:
        (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                             "sharded_backend_version": 1}))
        if legacy_common is not None:
            (directory / "common.pt").write_bytes(legacy_common)
        (directory.parent / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def write_single(root: Path, whole: Dict[str, np.ndarray], num_layers: int, swiglu: bool, common: bytes,
                 iteration: int = 20, tp: int = 1, pp: int = 1, common_pt: bytes = None,
                 dtype=torch.float32) -> Path:
    """One process writes the chunks of every (tensor, pipeline) rank of a tp x pp run, as `dtype`. `common`
    is torch.save([common state]) for the `common_state` object (Megatron-Core 0.19); with `common_pt`
    (torch.save(common state)) the state goes into common.pt instead, as Megatron-Core 0.18 writes it."""
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    states = [rank_state(whole, num_layers, tp, pp, t, p, swiglu, None if common_pt or (t, p) != (0, 0)
                         else common, dtype=dtype) for p in range(pp) for t in range(tp)]
    save(directory, merge_states(states), iteration, common_pt)
    return root


def write_on_rank(rank: int, world: int, port: int, jobs: List[dict]) -> None:
    """torch.multiprocessing target: join a gloo group and write each job's checkpoint collectively. A job is
    {"root", "iteration", "common" (bytes)} plus {"whole", "num_layers", "swiglu", "tp", "pp"} for a dense
    model (rank = pp_rank * tp + tp_rank) or {"experts", "dense", "ep"} for an expert-parallel one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for job in jobs:
            directory = Path(job["root"]) / f"iter_{job['iteration']:07d}"
            os.makedirs(directory, exist_ok=True)
            dist.barrier()
            common = job["common"] if rank == 0 else None
            if "experts" in job:
                state = moe_rank_state(job["experts"], job["ep"], rank)
                if rank == 0:
                    state.update(rank_state(job["dense"], job["num_layers"], 1, 1, 0, 0, True, common, False))
            else:
                tp_rank, pp_rank = rank % job["tp"], rank // job["tp"]
                state = rank_state(job["whole"], job["num_layers"], job["tp"], job["pp"], tp_rank, pp_rank,
                                   job["swiglu"], common)
            save(directory, state, job["iteration"])
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_writers(jobs: List[dict], world: int = 2, timeout: float = 300) -> None:
    """Run write_on_rank in `world` fresh processes (torch.multiprocessing, gloo on a free local port); a
    failing rank raises here, and all are killed after `timeout` seconds. The processes are forked from a
    fresh server process that imported this module (and PyTorch) once, not from the test process."""
    import multiprocessing
    import time

    import torch.multiprocessing as mp

    from multiproc import free_port

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.get_context(method).set_forkserver_preload([__name__])
    context = mp.start_processes(write_on_rank, args=(world, free_port(), jobs), nprocs=world, join=False,
                                 start_method=method)
    deadline = time.time() + timeout
    try:
        while not context.join(timeout=1):
            if time.time() > deadline:
                raise TimeoutError(f"the {world} torch_dist writer processes did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
