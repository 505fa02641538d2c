"""Gradient buckets, overlapped reduction and the distributed optimizer: on 2 and 4 ranks the loss curves
and final parameters equal the single-process run; optimizer state per rank is 1/DP of the whole; a
distributed-optimizer checkpoint resumes exactly, also at another data-parallel size; NaN gradients are
reported with rank and parameter."""
import shutil
import tempfile

import numpy as np
import pytest

from multiproc import run_on_ranks
from workers import ddp_checks

STEPS = ddp_checks.STEPS


@pytest.fixture(scope="module")
def single():
    return ddp_checks.run()


@pytest.fixture(scope="module")
def root():
    return tempfile.mkdtemp(prefix="mindtron_distopt_")


@pytest.fixture(scope="module")
def launches(root):
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
    buckets = launches[layout][0]["buckets"]
    for size in sizes:
        # two moments per element; a bucket pads to a multiple of dp, so a rank holds at most one more element
        assert size <= full / dp + 2 * buckets, (layout, sizes, full, buckets)
    for result in launches["dp2_buckets"]:
        assert result["state_numel"] == full  # without sharding every rank holds everything


def test_distributed_optimizer_checkpoint_holds_one_shard_per_rank(launches):
    assert launches["files"][0] == ["meta.json", "model.safetensors", "optimizer_shard_dp000_of_002.safetensors",
                                    "optimizer_shard_dp001_of_002.safetensors"]


def test_distributed_optimizer_resume_is_exact(launches):
    for result in launches["dp4_distopt_resume"]:
        np.testing.assert_array_equal(result["resumed"], result["full"])


def test_resume_at_another_data_parallel_size(single, launches):
    """Saved by DP=2 half-way, resumed by DP=4: the remaining iterations give the single-process losses."""
    for saved in launches["dp2_distopt_saved"]:
        np.testing.assert_allclose(saved["loss"], single["loss"][:STEPS // 2], rtol=1e-5)
    for resumed in launches["dp4_resumed_from_dp2"]:
        np.testing.assert_allclose(resumed["loss"], single["loss"][STEPS // 2:], rtol=1e-5)
        for name, want in single["params"].items():
            np.testing.assert_allclose(resumed["params"][name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_nan_gradient_is_reported_with_rank_and_parameter():
    """Every rank stops with the ranks that found a NaN; the rank holding it also names the parameter."""
    messages = run_on_ranks(2, "tests/workers/ddp_checks.py:nan_report", timeout=300)
    for message in messages:
        assert message.startswith("found NaN or Inf in the local gradients of rank(s) [1]"), message
    assert "layer.bias" not in messages[0] and "layer.weight" not in messages[0]
    assert "on this rank (rank 1) in layer.bias (" in messages[1]


def test_overlap_reduces_buckets_before_finish(launches):
    for rank, result in enumerate(launches["reduction_timing"]):
        on, off = result["overlap_True"], result["overlap_False"]
        assert on["reduced_before_finish"] == [True] and off["reduced_before_finish"] == [False]
        np.testing.assert_allclose(on["data_before_finish"], np.full(15, 1.5))  # already the mean of 1 and 2
        np.testing.assert_allclose(off["data_before_finish"], np.full(15, rank + 1.0))  # still local
        for a, b in zip(on["grads"], off["grads"]):
            np.testing.assert_array_equal(a, b)


def test_delay_grad_reduce_waits_pipeline_rank_backward_steps(launches):
    first, second = (r["delay"] for r in launches["reduction_timing"])
    assert first == {"at_chunk_done": True, "after_one_step": True}  # pipeline rank 0: no wait
    assert second == {"at_chunk_done": False, "after_one_step": True}  # pipeline rank 1: one step later


def test_parameters_stay_stale_until_the_deferred_gather(launches):
    for result in launches["deferred_param_gather"]:
        now, deferred = result["overlap_False"], result["overlap_True"]
        for before, after, want in zip(deferred["after_step"], deferred["after_sync"], now["after_sync"]):
            np.testing.assert_array_equal(before, np.ones_like(before))  # not yet written
            np.testing.assert_array_equal(after, want)
            assert not np.allclose(want, 1.0)  # the step did change them
        for a, b in zip(now["after_step"], now["after_sync"]):
            np.testing.assert_array_equal(a, b)  # gathered within step()


def test_fp16_distributed_optimizer_resume_is_exact(launches):
    """fp16 weights: the checkpoint carries the fp32 main pieces, so the resumed run repeats the losses."""
    for result in launches["dp2_distopt_fp16_resume"]:
        assert len(result["full"]) == STEPS
        np.testing.assert_array_equal(result["resumed"], result["full"])


def test_tied_embedding_copies_stay_equal_with_the_distributed_optimizer(launches):
    """PP=2 x DP=2: the first stages' word embeddings and the last stages' head copies end equal."""
    copies = [(name, value) for result in launches["pp2_dp2_distopt"] for name, value in result["tied"].items()]
    assert sorted(name.rsplit(".", 2)[-2] for name, _ in copies) == ["word_embeddings"] * 2 + [
        "word_embeddings_for_head"] * 2
    for _, value in copies:
        np.testing.assert_array_equal(value, copies[0][1])


@pytest.mark.parametrize("saved_dp", [2, 4])
def test_resume_at_data_parallel_size_one_regathers_every_shard(single, launches, root, saved_dp):
    """Checkpoints saved by DP=2 and DP=4 half-way load into one process: the shards are regathered and
    the remaining iterations give the single-process losses."""
    path = root if saved_dp == 2 else root + "_dp4"
    resumed = ddp_checks.run(bucket_size=ddp_checks.SMALL_BUCKETS, use_distributed_optimizer=True, load_checkpoint=path)
    np.testing.assert_allclose(resumed["loss"], single["loss"][STEPS // 2:], rtol=1e-5)


def test_a_missing_optimizer_shard_is_a_clear_error(launches, root, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    (copy / f"iter_{STEPS // 2:07d}" / "mp_rank_00" / "optimizer_shard_dp001_of_002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard files are incomplete"):
        ddp_checks.run(bucket_size=ddp_checks.SMALL_BUCKETS, use_distributed_optimizer=True, load_checkpoint=str(copy))


def test_expert_parameters_reduce_over_the_expert_data_parallel_group(launches):
    for rank, result in enumerate(launches["expert_groups"]):
        group = result["expert_group"]
        assert rank in group and len(group) == 2 and result["buckets"] == 2
        np.testing.assert_allclose(result["dense"], np.full((2, 2), 1.5))  # mean of ranks 0..3
        # summed over its 2 ranks, divided by the data-parallel size 4 (an expert's gradient already holds the
        # tokens of its expert-parallel peers): Megatron's expert_gradient_scaling_factor = 1 / dp
        np.testing.assert_allclose(result["expert"], np.full((3,), np.sum(group) / 4))


def test_one_process_keeps_gradients_per_parameter():
    """With no collective to feed (one process), a bucket skips the flat buffer: gradients stay one tensor per
    parameter, micro-batches add up, and --check-for-nan-in-loss-and-grad still names the parameter."""
    import mindspore as ms
    from mindspore import Tensor
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core.distributed import GradBuffer, GradBufferConfig

    ps.initialize_model_parallel(1, 1)
    try:
        params = [ms.Parameter(Tensor(np.zeros((4, 3), np.float32)), name="layer.weight"),
                  ms.Parameter(Tensor(np.zeros((3,), np.float32)), name="layer.bias")]
        buffer = GradBuffer(params, [0, 0], GradBufferConfig(check_for_nan=True))
        first = [np.arange(12, dtype=np.float32).reshape(4, 3), np.array([1.0, 2.0, 3.0], np.float32)]
        second = [np.full((4, 3), 0.5, np.float32), np.array([-1.0, 0.25, 4.0], np.float32)]
        for grads in (first, second):
            buffer.add(0, [Tensor(g) for g in grads])
        buffer.finish()
        assert all(b.data is None and b.parts is not None for b in buffer.buckets)
        for got, a, b in zip(buffer.grads(), first, second):
            assert got.shape == a.shape and np.array_equal(got.asnumpy(), a + b)
        buffer.reset()
        buffer.add(0, [Tensor(first[0]), Tensor(np.array([1.0, np.nan, 1.0], np.float32))])
        with pytest.raises(RuntimeError, match="rank 0.*layer.bias"):
            buffer.finish()
    finally:
        ps.destroy_model_parallel()
