"""Gradient buckets, overlapped reduction and the distributed optimizer: on 2 and 4 ranks the loss curves
and final parameters equal the single-process run; optimizer state per rank is 1/DP of the whole; a
distributed-optimizer checkpoint resumes exactly, also at another data-parallel size; NaN gradients are
reported with rank and parameter."""
import tempfile

import numpy as np
import pytest

from multiproc import run_on_ranks
from workers import ddp_checks
from workers import training_checks as tc

STEPS = ddp_checks.STEPS


@pytest.fixture(scope="module")
def single():
    return ddp_checks.run()


@pytest.fixture(scope="module")
def launches():
    root = tempfile.mkdtemp(prefix="mindtron_distopt_")
    two = run_on_ranks(2, "tests/workers/ddp_checks.py:layouts_2", {"root": root}, timeout=900)
    four = run_on_ranks(4, "tests/workers/ddp_checks.py:layouts_4", {"root": root}, timeout=1200)
    runs = {}
    for per_rank in (two, four):
        for result in per_rank:
            for layout, value in result.items():
                runs.setdefault(layout, []).append(value)
    return runs


LAYOUTS = ["dp2_buckets", "dp2_overlap", "dp2_distopt", "dp2_distopt_overlap", "dp2_no_ddp", "dp4", "dp4_overlap",
           "dp4_distopt", "tp2_dp2_distopt", "pp2_dp2_distopt", "pp2_vpp2_dp2_overlap", "pp2_vpp2_dp2_overlap_no_delay"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_curves_equal_single_process(single, launches, layout):
    last = [r for r in launches[layout] if r["last_stage"]]
    assert last
    for result in last:
        np.testing.assert_allclose(result["loss"], single["loss"], rtol=1e-5, err_msg=layout)
        np.testing.assert_allclose([l for _, l in result["eval"]], [l for _, l in single["eval"]], rtol=1e-5)


@pytest.mark.parametrize("layout", ["dp2_buckets", "dp2_overlap", "dp2_distopt", "dp2_distopt_overlap", "dp4",
                                    "dp4_overlap", "dp4_distopt"])
def test_final_parameters_equal_single_process(single, launches, layout):
    for result in launches[layout]:
        assert result["buckets"] > 3  # small buckets: the model really spreads over several
        assert set(result["params"]) == set(single["params"])
        for name, want in single["params"].items():
            # Adam divides by sqrt(v): where a gradient is ~0, fp32 round-off of the data-parallel sum moves
            # the update by up to ~1e-4 of the learning rate (3e-3), hence the absolute tolerance.
            np.testing.assert_allclose(result["params"][name], want, rtol=1e-5, atol=1e-6, err_msg=f"{layout} {name}")


@pytest.mark.parametrize("layout, dp", [("dp2_distopt", 2), ("dp4_distopt", 4)])
def test_optimizer_state_per_rank_is_one_over_dp(single, launches, layout, dp):
    full = single["state_numel"]
    sizes = [r["state_numel"] for r in launches[layout]]
    assert sum(sizes) >= full  # every element has its moments somewhere (padding may add a few)
    for size in sizes:
        assert size <= full / dp + 2 * 128, (layout, sizes, full)  # padding: under one element per bucket x dp
    for result in launches["dp2_buckets"]:
        assert result["state_numel"] == full  # without sharding every rank holds everything


def test_distributed_optimizer_checkpoint_holds_one_shard_per_rank(launches):
    assert launches["files"][0] == ["meta.json", "model.safetensors", "optimizer_shard_dp000_of_002.safetensors",
                                    "optimizer_shard_dp001_of_002.safetensors"]


def test_distributed_optimizer_resume_is_exact(launches):
    for result in launches["dp4_distopt_resume"]:
        np.testing.assert_array_equal(result["resumed"], result["full"])


def test_resume_at_another_data_parallel_size(single, launches):
    """Saved by DP=2 at iteration 4, resumed by DP=4: iterations 5-8 give the single-process losses."""
    for saved in launches["dp2_distopt_saved"]:
        np.testing.assert_allclose(saved["loss"], single["loss"][:STEPS // 2], rtol=1e-5)
    for resumed in launches["dp4_resumed_from_dp2"]:
        np.testing.assert_allclose(resumed["loss"], single["loss"][STEPS // 2:], rtol=1e-5)
        for name, want in single["params"].items():
            np.testing.assert_allclose(resumed["params"][name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_nan_gradient_is_reported_with_rank_and_parameter():
    """The rank holding the NaN stops before the reduction with the name; its peer's reduction then fails too
    (Megatron's check is also local: the other ranks stop at the collective)."""
    messages = run_on_ranks(2, "tests/workers/ddp_checks.py:nan_report", timeout=300)
    assert messages[0] != "" and "layer.bias" not in messages[0]
    assert messages[1].startswith("rank 1: found NaN or Inf in the local gradients of layer.bias")


def test_expert_parameters_reduce_over_the_expert_data_parallel_group(launches):
    for rank, result in enumerate(launches["expert_groups"]):
        group = result["expert_group"]
        assert rank in group and len(group) == 2 and result["buckets"] == 2
        np.testing.assert_allclose(result["dense"], np.full((2, 2), 1.5))  # mean of ranks 0..3
        np.testing.assert_allclose(result["expert"], np.full((3,), np.mean(group)))  # mean over its 2 ranks
