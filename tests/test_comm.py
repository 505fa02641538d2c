"""Collectives of parallel_core.comm on 2 and 4 ranks, in the world group and in sub-groups, through the
native ops where the backend has them ("default") and through the all-reduce constructions ("fallback"),
each compared with the result computed locally."""
import numpy as np
import pytest
from mindspore import Tensor

from conftest import assert_all_close, worst_errors
from mindtron.parallel_core import comm

OPS = ["all_reduce_sum", "all_reduce_max", "all_reduce_min", "all_reduce_fp16", "all_gather_dim0",
       "all_gather_dim1", "all_gather_int32", "reduce_scatter_dim0", "reduce_scatter_dim1",
       "all_to_all_split0_concat0", "all_to_all_split0_concat1", "all_to_all_split1_concat0",
       "all_to_all_uneven", "broadcast_from0", "broadcast_from1", "broadcast_int32", "barrier"]


def _fp16_tolerance(name):
    return 2e-3 if name.endswith("fp16") else None  # fp16 sums round at ~5e-4 per addition


def _required(groups):
    return [f"{mode}/{name}" for mode in ("default", "fallback") for name in
            [f"{g}/{op}" for g in groups for op in OPS] +
            ["exchange/one_way", "exchange/both_ways", "exchange/both_ways_equal"]]


def test_collectives_on_2_ranks(foundation_2):
    assert_all_close(worst_errors(foundation_2, "comm"), 1e-6, _required(["world"]), _fp16_tolerance)


def test_workers_arm_the_exit_guard(foundation_2):
    """Joining the cluster registers the guard for MindSpore's exit race (tests/test_teardown.py)."""
    assert [rank["exit_guard_armed"] for rank in foundation_2] == [True, True]


def test_collectives_on_4_ranks_world_and_subgroups(foundation_4):
    assert_all_close(worst_errors(foundation_4, "comm"), 1e-6,
                     _required(["world", "pairs_01_23", "pairs_02_13"]), _fp16_tolerance)


def test_single_process_world():
    """Without msrun the world is one process and every collective is the identity."""
    comm.init_distributed()
    assert comm.get_world_size() == 1 and comm.get_rank() == 0
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    group = comm.world_group()
    for out in (comm.all_reduce(Tensor(x), group), comm.all_reduce(Tensor(x), group, "max"),
                comm.all_gather(Tensor(x), group, 1), comm.reduce_scatter(Tensor(x), group),
                comm.broadcast(Tensor(x), 0, group),
                comm.all_to_all(Tensor(x), group, input_split_sizes=[2], output_split_sizes=[2])):
        np.testing.assert_array_equal(out.asnumpy(), x)


def test_bad_arguments_are_named():
    group = comm.world_group()
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(Tensor(np.ones(2, np.float32)), group, "prod")
    with pytest.raises(ValueError, match="dim 3 is out of range"):
        comm.all_gather(Tensor(np.ones((2, 2), np.float32)), group, 3)
    with pytest.raises(ValueError, match="input_split_sizes sum to 3"):
        comm.all_to_all(Tensor(np.ones((2, 2), np.float32)), group, input_split_sizes=[3],
                        output_split_sizes=[3])
