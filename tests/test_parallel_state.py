"""Process groups of parallel_core.parallel_state: Megatron's layout for worlds of 1, 2, 4 and 8, validation
of sizes, and (through msrun) that every group a rank joins communicates among exactly those ranks."""
import itertools
import os

import pytest

from conftest import assert_all_close, worst_errors
from mindtron.parallel_core import comm, cpu_kernels, runtime
from mindtron.parallel_core import parallel_state as ps

DENSE_KINDS = {"tp": {"tp"}, "pp": {"pp"}, "cp": {"cp"}, "dp": {"dp"}, "dp-cp": {"dp", "cp"},
               "tp-pp": {"tp", "pp"}, "tp-cp": {"tp", "cp"}, "tp-dp": {"tp", "dp"},
               "tp-dp-cp": {"tp", "dp", "cp"}}
EXPERT_KINDS = {"ep": {"ep"}, "expert-tp": {"etp"}, "tp-ep": {"etp", "ep"}, "tp-ep-pp": {"etp", "ep", "pp"},
                "expert-dp": {"edp"},
                "expert-dp-cp": {"edp"}}


def brute_force_groups(world, tp=1, pp=1, cp=1, ep=1, order="tp-cp-ep-dp-pp", etp=None):
    """Groups from each rank's coordinates: rank = sum(coord[axis] * stride[axis]), first axis fastest.

    Dense groups use the axes without ep. Expert groups use Megatron-Core 0.19's second grid: the same
    order, tp sized etp (default tp), no cp, and edp = world / (etp x ep x pp) in dp's place. A group of
    kind K holds the ranks equal in every axis outside K.
    """
    etp = tp if etp is None else etp
    dp = world // (tp * pp * cp)
    sizes = {"tp": tp, "pp": pp, "cp": cp, "dp": dp}
    tokens = [t for t in order.split("-")]

    def coords(rank, axes):
        out = {}
        for axis in axes:
            out[axis], rank = rank % axes_sizes[axis], rank // axes_sizes[axis]
        return out

    groups = {}
    for kinds, axes in ((DENSE_KINDS, [t for t in tokens if t != "ep"]),
                        (EXPERT_KINDS, [{"dp": "edp", "tp": "etp"}.get(t, t) for t in tokens if t != "cp"])):
        axes_sizes = dict(sizes, ep=ep, etp=etp, edp=world // (etp * ep * pp))
        for kind, members in kinds.items():
            by_key = {}
            for rank in range(world):
                c = coords(rank, axes)
                key = tuple(c[a] for a in axes if a not in members)
                by_key.setdefault(key, []).append(rank)
            groups[kind] = sorted(by_key.values())
    return groups


LAYOUTS = [
    (1, {}), (2, dict(tp=2)), (2, dict(pp=2)), (2, dict(cp=2)), (2, dict(ep=2)),
    (4, dict(tp=2)), (4, dict(tp=2, pp=2)), (4, dict(pp=4)), (4, dict(cp=2, ep=2)), (4, dict(ep=4)),
    (4, dict(tp=2, cp=2)), (8, dict(tp=2, pp=2)), (8, dict(tp=2, cp=2, ep=2)), (8, dict(pp=2, ep=4)),
    (8, dict(tp=2, pp=2, cp=2)), (8, dict(tp=2, pp=2, ep=2)), (8, dict(tp=4, pp=2)), (8, dict(cp=4, ep=2)),
    (8, dict(tp=2, pp=2, order="tp-pp-dp")), (8, dict(tp=2, cp=2, ep=2, order="tp-cp-dp-ep-pp")),
    (4, dict(tp=2, ep=2, etp=1)), (8, dict(tp=2, ep=4, etp=1)), (8, dict(tp=1, ep=2, etp=2)),
    (8, dict(tp=2, cp=2, ep=4, etp=1)), (8, dict(tp=2, pp=2, ep=2, etp=1)),
]


def _layout(world, sizes):
    return ps.make_layout(world, sizes.get("tp", 1), sizes.get("pp", 1), None, sizes.get("cp", 1),
                          sizes.get("ep", 1), sizes.get("order", ps.DEFAULT_ORDER), sizes.get("etp"))


@pytest.mark.parametrize("world,sizes", LAYOUTS, ids=[f"w{w}-{s}" for w, s in LAYOUTS])
def test_groups_equal_coordinate_brute_force(world, sizes):
    got = ps.generate_rank_groups(_layout(world, sizes))
    order = sizes.get("order", ps.DEFAULT_ORDER)
    if "ep" not in order:
        order += "-ep"
    want = brute_force_groups(world, sizes.get("tp", 1), sizes.get("pp", 1), sizes.get("cp", 1),
                              sizes.get("ep", 1), order, sizes.get("etp"))
    for kind in want:
        assert sorted(got[kind]) == want[kind], kind
        assert all(g == sorted(g) for g in got[kind]), kind
        assert sorted(itertools.chain(*got[kind])) == list(range(world)), kind  # a partition of the world


def test_megatron_docstring_example_16_ranks_tp2_pp4():
    """Megatron's initialize_model_parallel docstring: 16 GPUs, tp 2, pp 4 -> these groups, in this order."""
    groups = ps.generate_rank_groups(ps.make_layout(16, 2, 4))
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert groups["position-embedding"] == [[0], [1], [2], [3]]
    assert groups["tp-pp"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


def test_expert_groups_split_data_parallel():
    """8 ranks, ep 2: experts spread over dp-neighbours, expert-dp holds the same expert."""
    groups = ps.generate_rank_groups(ps.make_layout(8, expert_model_parallel_size=2))
    assert groups["dp"] == [list(range(8))]
    assert groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["expert-dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_expert_groups_with_context_parallel_follow_megatron_core_0_19():
    """Megatron-Core 0.19 builds expert groups on a grid without cp: with tp 2, cp 2, ep 2 on 8 ranks the
    expert-parallel peers are context-parallel neighbours, and expert tp can differ from tp."""
    groups = ps.generate_rank_groups(ps.make_layout(8, 2, 1, None, 2, 2))
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["expert-dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    groups = ps.generate_rank_groups(ps.make_layout(4, 2, expert_model_parallel_size=2,
                                                    expert_tensor_parallel_size=1))
    assert groups["tp"] == [[0, 1], [2, 3]] and groups["expert-tp"] == [[0], [1], [2], [3]]
    assert groups["ep"] == [[0, 1], [2, 3]] and groups["tp-ep"] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("world,kwargs,flag", [
    (4, dict(tensor_model_parallel_size=3), "--tensor-model-parallel-size"),
    (8, dict(tensor_model_parallel_size=2, expert_model_parallel_size=3), "--expert-model-parallel-size"),
    (4, dict(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=2),
     "--pipeline-model-parallel-size"),
    (4, dict(context_parallel_size=0), "--context-parallel-size"),
    (4, dict(order="tp-dp-xx"), "tp-dp-xx"),
    (8, dict(expert_model_parallel_size=3), "--expert-model-parallel-size"),
    (6, dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=4), "--expert-tensor-parallel-size"),
])
def test_invalid_sizes_name_the_flag(world, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        ps.make_layout(world, **kwargs)


@pytest.mark.parametrize("cores,processes,pp,want", [
    (2, 1, 1, 2), (2, 2, 1, 1), (2, 2, 2, 2), (2, 4, 4, 1), (2, 4, 2, 1), (8, 2, 2, 8), (8, 4, 2, 4), (16, 4, 1, 4),
    (16, 8, 4, 8), (3, 2, 1, 1)])
def test_kernel_threads_follow_the_layout(monkeypatch, cores, processes, pp, want):
    """A process's share of the host's cores; pipeline stages share their neighbours' cores unless the host
    has more processes than cores."""
    monkeypatch.delenv("MINDTRON_CPU_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(comm, "processes_on_this_host", lambda: processes)
    assert runtime.cpu_kernel_threads(pp) == want


def test_kernel_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINDTRON_CPU_THREADS", "3")
    assert runtime.cpu_kernel_threads(2) == 3
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("MINDTRON_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="MINDTRON_CPU_THREADS"):
            runtime.cpu_kernel_threads()
    if cpu_kernels.enabled():  # refused by initialize_model_parallel, which leaves nothing half set up
        with pytest.raises(ValueError, match="MINDTRON_CPU_THREADS"):
            ps.initialize_model_parallel()
        assert not ps.model_parallel_is_initialized()


def test_world_of_one_without_launcher():
    ps.initialize_model_parallel()
    try:
        if cpu_kernels.enabled() and "MINDTRON_CPU_THREADS" not in os.environ:
            assert cpu_kernels.threads() == len(os.sched_getaffinity(0))  # one process: every core
        assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_tensor_model_parallel_rank() == 0
        assert ps.get_pipeline_model_parallel_world_size() == 1 and ps.is_pipeline_first_stage()
        assert ps.is_pipeline_last_stage() and ps.get_data_parallel_world_size() == 1
        assert list(ps.get_embedding_group().ranks) == [0]
        with pytest.raises(RuntimeError, match="already initialized"):
            ps.initialize_model_parallel()
    finally:
        ps.destroy_model_parallel()
    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
    assert not ps.model_parallel_is_initialized()


def test_groups_communicate_on_2_ranks(foundation_2):
    errors = worst_errors(foundation_2, "state")
    kinds = ["tp", "pp", "cp", "dp", "dp-cp", "ep", "expert-dp", "embedding", "tp_rank", "kernel_threads"]
    assert_all_close(errors, 0.0, [f"state/{t}=2/{k}" for t in ("tensor", "pipeline", "context", "expert")
                                   for k in kinds])


def test_groups_communicate_on_4_ranks(foundation_4):
    errors = worst_errors(foundation_4, "state")
    assert_all_close(errors, 0.0, ["state/tensor=2,pipeline=2/tp-pp", "state/context=2,expert=2/expert-dp-cp",
                                   "state/pipeline=4,virtual=2/embedding", "state/expert=4/ep",
                                   "state/pipeline=4,virtual=2/kernel_threads", "state/tensor=2/kernel_threads"])
