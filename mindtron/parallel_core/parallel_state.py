"""Process groups for tensor, pipeline, context, expert and data parallelism, with Megatron's rank layout.

Ranks are laid out on a grid whose axes follow `order` ("tp-cp-ep-dp-pp" by default), the first axis
varying fastest: with tp=2, dp=2, pp=2, ranks 0,1 share a tensor-parallel group, 0,2 a data-parallel group
and 0,4 a pipeline group. A group of kind "tp-dp" holds the ranks that differ only in their tp and dp
coordinates. Expert layers use a second grid over the same ranks, as Megatron-Core 0.19 builds it: the
same axis order with tp sized by the expert tensor-parallel size (--expert-tensor-parallel-size, default
tp), cp folded away (size 1), ep and the expert data-parallel size edp = world / (etp x ep x pp). With etp =
tp and cp = 1 the expert ranks simply split the data-parallel axis as ep x (dp / ep). A rank therefore holds
the same shard and the same experts here as it would in Megatron.

`generate_rank_groups()` computes every group for every rank without communicating (used by tests and
tools); `initialize_model_parallel()` builds this rank's groups through `comm`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from mindtron.parallel_core import comm
from mindtron.parallel_core.comm import ProcessGroup
from mindtron.parallel_core.runtime import size_cpu_kernel_threads

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
_AXES = ("tp", "cp", "ep", "dp", "pp")
_FLAG = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
    "dp": "the data-parallel size (world size / (tp x pp x cp))",
}


@dataclass(frozen=True)
class ParallelLayout:
    """Validated parallel sizes of one job; `dp` is derived as world / (tp x pp x cp), the expert data-parallel
    size `edp` as world / (etp x ep x pp)."""

    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    vpp: Optional[int]
    order: tuple  # axis names, fastest first, always all five
    etp: int = 1
    edp: int = 1


def make_layout(world_size: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                virtual_pipeline_model_parallel_size: Optional[int] = None, context_parallel_size: int = 1,
                expert_model_parallel_size: int = 1, order: str = DEFAULT_ORDER,
                expert_tensor_parallel_size: Optional[int] = None) -> ParallelLayout:
    """Check the sizes and the order string; raise ValueError naming the flag to change."""
    if expert_tensor_parallel_size is None:
        expert_tensor_parallel_size = tensor_model_parallel_size
    sizes = {"tp": tensor_model_parallel_size, "pp": pipeline_model_parallel_size,
             "cp": context_parallel_size, "ep": expert_model_parallel_size, "etp": expert_tensor_parallel_size}
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{_FLAG[name]} must be a positive integer, got {value!r}")
    tp, pp, cp, ep, etp = (int(sizes[k]) for k in ("tp", "pp", "cp", "ep", "etp"))
    model = tp * pp * cp
    if world_size % model:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) x context ({cp}) "
            f"parallel sizes = {model}; change --tensor-model-parallel-size, --pipeline-model-parallel-size "
            f"or --context-parallel-size, or launch a multiple of {model} processes")
    dp = world_size // model
    expert_model = etp * ep * pp
    if world_size % expert_model:
        raise ValueError(
            f"world size {world_size} is not divisible by expert tensor ({etp}) x expert ({ep}) x pipeline ({pp}) "
            f"parallel sizes = {expert_model}: the experts' ranks must tile the job; change "
            f"--expert-model-parallel-size or --expert-tensor-parallel-size")
    if virtual_pipeline_model_parallel_size is not None:
        if virtual_pipeline_model_parallel_size < 1:
            raise ValueError("--virtual-pipeline-model-parallel-size must be a positive integer, got "
                             f"{virtual_pipeline_model_parallel_size}")
        if pp < 2:
            raise ValueError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size "
                             f"greater than 1 (interleaved schedule), got {pp}")
    axes = _parse_order(order, {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp": dp})
    return ParallelLayout(world_size, tp, pp, cp, ep, dp, virtual_pipeline_model_parallel_size, axes,
                          etp=etp, edp=world_size // expert_model)


def _parse_order(order: str, sizes: Dict[str, int]) -> tuple:
    tokens = [t for t in order.lower().split("-") if t]
    unknown = [t for t in tokens if t not in _AXES]
    if unknown or len(set(tokens)) != len(tokens):
        raise ValueError(f"parallel order {order!r} must use each of {'/'.join(_AXES)} at most once, "
                         f"separated by '-' (default {DEFAULT_ORDER!r})")
    for name in _AXES:
        if name not in tokens:
            if sizes[name] != 1:
                raise ValueError(f"parallel order {order!r} leaves out {name!r} but its size is {sizes[name]}")
            tokens.append(name)
    return tuple(tokens)


def _groups_over(names: List[str], sizes: List[int], members: set) -> List[List[int]]:
    """All groups of ranks that differ only along the axes in `members`.

    rank = sum(coord[k] * prod(sizes[:k])): the first axis varies fastest. Groups are listed with the
    first non-member axis varying fastest, and ranks inside a group with the first member axis fastest.
    """
    grid = np.arange(int(np.prod(sizes))).reshape(sizes[::-1])  # numpy axis a <-> names[-1 - a]
    axis = {name: len(names) - 1 - k for k, name in enumerate(names)}
    inside = sorted(axis[n] for n in names if n in members)
    outside = sorted(axis[n] for n in names if n not in members)
    size = int(np.prod([sizes[names.index(n)] for n in names if n in members], dtype=np.int64))
    return grid.transpose(outside + inside).reshape(-1, size).tolist()


def generate_rank_groups(layout: ParallelLayout) -> Dict[str, List[List[int]]]:
    """Every group of every kind for `layout`, without communicating.

    Kinds: tp, pp, cp, dp, dp-cp, tp-pp (model parallel), tp-cp, tp-dp, tp-dp-cp, and on the expert grid
    ep, expert-tp, tp-ep (expert tp x ep: where tokens are dispatched), tp-ep-pp, expert-dp (expert-dp-cp is the same
    group: the expert grid has no cp axis), and embedding, position-embedding.
    """
    dense_names = [n for n in layout.order if n != "ep"]
    dense_sizes = [getattr(layout, n) for n in dense_names]
    expert_names = list(layout.order)
    expert_axis = {"tp": layout.etp, "cp": 1, "ep": layout.ep, "dp": layout.edp, "pp": layout.pp}
    expert_sizes = [expert_axis[n] for n in expert_names]

    def dense(*axes):
        return _groups_over(dense_names, dense_sizes, set(axes))

    def expert(*axes):
        return _groups_over(expert_names, expert_sizes, set(axes))

    groups = {
        "tp": dense("tp"), "pp": dense("pp"), "cp": dense("cp"), "dp": dense("dp"),
        "dp-cp": dense("dp", "cp"), "tp-pp": dense("tp", "pp"), "tp-cp": dense("tp", "cp"),
        "tp-dp": dense("tp", "dp"), "tp-dp-cp": dense("tp", "dp", "cp"),
        "ep": expert("ep"), "expert-tp": expert("tp"), "tp-ep": expert("tp", "ep"),
        "tp-ep-pp": expert("tp", "ep", "pp"),
        "expert-dp": expert("dp"), "expert-dp-cp": expert("dp"),
    }
    # The first and last pipeline stages share the word embedding (tied output layer); the first stage
    # alone holds position embeddings.
    groups["embedding"] = [[g[0], g[-1]] if len(g) > 1 else list(g) for g in groups["pp"]]
    groups["position-embedding"] = [[g[0]] for g in groups["pp"]]
    return groups


# --------------------------------------------------------------------------------------------------------
# This rank's state
# --------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    layout: ParallelLayout
    all_groups: Dict[str, List[List[int]]]
    mine: Dict[str, ProcessGroup] = field(default_factory=dict)
    virtual_rank: Optional[int] = None
    virtual_size: Optional[int] = None


_STATE: Optional[_State] = None


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                              order: str = DEFAULT_ORDER,
                              expert_tensor_parallel_size: Optional[int] = None) -> ParallelLayout:
    """Build this rank's process groups (starting the communication backend if needed).

    Works without a launcher as a world of one process. Sizes are checked before any group is made. On CPU it
    also sizes mindtron's kernel threads for the layout (runtime.cpu_kernel_threads).
    """
    global _STATE
    if _STATE is not None:
        raise RuntimeError("model parallel groups are already initialized; call destroy_model_parallel() first")
    layout = make_layout(comm.get_world_size(), tensor_model_parallel_size, pipeline_model_parallel_size,
                         virtual_pipeline_model_parallel_size, context_parallel_size,
                         expert_model_parallel_size, order, expert_tensor_parallel_size)
    state = _State(layout, generate_rank_groups(layout))
    me = comm.get_rank()
    # Every rank walks the kinds in the same order and creates only the groups it belongs to.
    for kind, groups in state.all_groups.items():
        for ranks in groups:
            if me in ranks:
                state.mine[kind] = comm.new_group(ranks)
    for kind in ("embedding", "position-embedding"):
        state.mine.setdefault(kind, None)
    if virtual_pipeline_model_parallel_size is not None:
        state.virtual_rank, state.virtual_size = 0, virtual_pipeline_model_parallel_size
    size_cpu_kernel_threads(pipeline_model_parallel_size)  # (may refuse MINDTRON_CPU_THREADS: before _STATE)
    _STATE = state
    return layout


def destroy_model_parallel() -> None:
    """Forget this rank's groups (the communicators stay cached in `comm` for reuse)."""
    global _STATE
    _STATE = None


def model_parallel_is_initialized() -> bool:
    """Whether initialize_model_parallel() has run."""
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise RuntimeError("model parallel groups are not initialized; call "
                           "mindtron.parallel_core.parallel_state.initialize_model_parallel() first")
    return _STATE


def _group(kind: str) -> ProcessGroup:
    return _state().mine[kind]


def get_layout() -> ParallelLayout:
    """The validated sizes this job was initialized with."""
    return _state().layout


def get_all_rank_groups(kind: str) -> List[List[int]]:
    """Every group of `kind` in the job (see generate_rank_groups for the kinds)."""
    return _state().all_groups[kind]


# Groups ------------------------------------------------------------------------------------------------
def get_tensor_model_parallel_group() -> ProcessGroup:
    """Ranks that split each layer's weights (tensor parallel)."""
    return _group("tp")


def get_pipeline_model_parallel_group() -> ProcessGroup:
    """Ranks that hold successive pipeline stages of the same model replica."""
    return _group("pp")


def get_context_parallel_group() -> ProcessGroup:
    """Ranks that split the sequence for attention (context parallel)."""
    return _group("cp")


def get_data_parallel_group(with_context_parallel: bool = False) -> ProcessGroup:
    """Ranks holding the same model shard on different data (optionally with the cp ranks folded in)."""
    return _group("dp-cp" if with_context_parallel else "dp")


def get_model_parallel_group() -> ProcessGroup:
    """Ranks that together hold one full model replica (tp x pp)."""
    return _group("tp-pp")


def get_tensor_and_context_parallel_group() -> ProcessGroup:
    """tp x cp ranks."""
    return _group("tp-cp")


def get_tensor_and_data_parallel_group(with_context_parallel: bool = False) -> ProcessGroup:
    """tp x dp ranks (x cp when asked)."""
    return _group("tp-dp-cp" if with_context_parallel else "tp-dp")


def get_expert_model_parallel_group() -> ProcessGroup:
    """Ranks that hold different experts of the same MoE layer."""
    return _group("ep")


def get_tensor_and_expert_parallel_group() -> ProcessGroup:
    """Expert tp x ep ranks: the group tokens are dispatched over (Megatron's tp_ep group)."""
    return _group("tp-ep")


get_expert_tensor_and_model_parallel_group = get_tensor_and_expert_parallel_group  # Megatron-Core's newer name


def get_expert_tensor_model_pipeline_parallel_group() -> ProcessGroup:
    """Expert tp x ep x pp ranks: together they hold every expert of the model once."""
    return _group("tp-ep-pp")


def get_expert_tensor_parallel_group() -> ProcessGroup:
    """Ranks that split each expert's weights (--expert-tensor-parallel-size; the tp group by default)."""
    return _group("expert-tp")


def get_data_modulo_expert_parallel_group(with_context_parallel: bool = False) -> ProcessGroup:
    """Ranks holding the same experts (expert data parallel), where expert gradients are reduced. The expert
    grid has no context-parallel axis (Megatron-Core 0.19), so both spellings name the same group."""
    return _group("expert-dp")


get_expert_data_parallel_group = get_data_modulo_expert_parallel_group  # newer Megatron-Core name


def get_embedding_group() -> Optional[ProcessGroup]:
    """First and last pipeline stage of this replica (tied word embeddings); None if this rank is neither."""
    return _group("embedding")


def get_position_embedding_group() -> Optional[ProcessGroup]:
    """The first pipeline stage (position embeddings); None on other stages."""
    return _group("position-embedding")


# Sizes and ranks ---------------------------------------------------------------------------------------
def get_tensor_model_parallel_world_size() -> int:
    """Size of the tensor-parallel group."""
    return get_tensor_model_parallel_group().size


def get_tensor_model_parallel_rank() -> int:
    """This rank's index in its tensor-parallel group."""
    return get_tensor_model_parallel_group().rank


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of the first member of this tensor-parallel group."""
    return get_tensor_model_parallel_group().ranks[0]


def get_pipeline_model_parallel_world_size() -> int:
    """Number of pipeline stages."""
    return get_pipeline_model_parallel_group().size


def get_pipeline_model_parallel_rank() -> int:
    """This rank's pipeline stage."""
    return get_pipeline_model_parallel_group().rank


def get_pipeline_model_parallel_first_rank() -> int:
    """Global rank of the first stage of this pipeline."""
    return get_pipeline_model_parallel_group().ranks[0]


def get_pipeline_model_parallel_last_rank() -> int:
    """Global rank of the last stage of this pipeline."""
    return get_pipeline_model_parallel_group().ranks[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (the last stage's next is the first)."""
    group = get_pipeline_model_parallel_group()
    return group.ranks[(group.rank + 1) % group.size]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (the first stage's previous is the last)."""
    group = get_pipeline_model_parallel_group()
    return group.ranks[(group.rank - 1) % group.size]


def get_context_parallel_world_size() -> int:
    """Size of the context-parallel group."""
    return get_context_parallel_group().size


def get_context_parallel_rank() -> int:
    """This rank's index in its context-parallel group."""
    return get_context_parallel_group().rank


def get_context_parallel_global_ranks() -> List[int]:
    """Global ranks of this context-parallel group."""
    return list(get_context_parallel_group().ranks)


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    """Size of the data-parallel group."""
    return get_data_parallel_group(with_context_parallel).size


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    """This rank's index in its data-parallel group."""
    return get_data_parallel_group(with_context_parallel).rank


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    """Global rank of the first member of this data-parallel group."""
    return get_data_parallel_group(with_context_parallel).ranks[0]


def get_expert_model_parallel_world_size() -> int:
    """Size of the expert-parallel group."""
    return get_expert_model_parallel_group().size


def get_expert_model_parallel_rank() -> int:
    """This rank's index in its expert-parallel group."""
    return get_expert_model_parallel_group().rank


def get_expert_tensor_parallel_world_size() -> int:
    """Size of the expert tensor-parallel group."""
    return get_expert_tensor_parallel_group().size


def get_expert_tensor_parallel_rank() -> int:
    """This rank's index in its expert tensor-parallel group."""
    return get_expert_tensor_parallel_group().rank


def get_data_modulo_expert_parallel_world_size(with_context_parallel: bool = False) -> int:
    """Size of the expert-data-parallel group."""
    return get_data_modulo_expert_parallel_group(with_context_parallel).size


def get_data_modulo_expert_parallel_rank(with_context_parallel: bool = False) -> int:
    """This rank's index in its expert-data-parallel group."""
    return get_data_modulo_expert_parallel_group(with_context_parallel).rank


# Pipeline stages and virtual stages --------------------------------------------------------------------
def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    """Number of virtual stages per pipeline rank (None without interleaving)."""
    return _state().virtual_size


def set_virtual_pipeline_model_parallel_world_size(size: Optional[int]) -> None:
    """Set the number of virtual stages per pipeline rank."""
    _state().virtual_size = size


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    """Which virtual stage (model chunk) is running now (None without interleaving)."""
    return _state().virtual_rank


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    """Set which virtual stage is running now (schedules call this around each chunk)."""
    _state().virtual_rank = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the stage that holds the embedding (and, with virtual stages, on its first chunk)."""
    if not ignore_virtual and get_virtual_pipeline_model_parallel_world_size() is not None:
        if get_virtual_pipeline_model_parallel_rank() != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the stage that holds the output head (and, with virtual stages, on its last chunk)."""
    size = get_virtual_pipeline_model_parallel_world_size()
    if not ignore_virtual and size is not None and get_virtual_pipeline_model_parallel_rank() != size - 1:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    """True on ranks that hold a copy of the word embedding (first or last stage)."""
    if _group("embedding") is None:
        return False
    if ignore_virtual:
        return True
    return is_pipeline_first_stage() or is_pipeline_last_stage()


def is_rank_in_position_embedding_group() -> bool:
    """True on ranks that hold the position embedding (the first stage)."""
    return _group("position-embedding") is not None
