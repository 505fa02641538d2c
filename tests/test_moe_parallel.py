"""MoE under expert parallelism: every layout trains the single-process MoE GPT's loss curve with the same
gradient norms, auxiliary losses and token counts (EP=2 and EP=4, allgather vs alltoall dispatcher, grouped
experts, the distributed optimizer, EP with TP + sequence parallel, expert tensor parallel 1, EP x PP), also
with hot experts (the same model, fewer all-to-all bytes, the monitor's choices, an exact resume)."""
import numpy as np
import pytest

from multiproc import run_on_ranks
from workers import moe_checks

LAYOUTS_2 = ["ep2_allgather", "ep2_alltoall", "ep2_grouped", "ep2_distopt", "tp2_sp_ep2_etp1", "ep2_hot",
             "tp2_sp_ep2_etp1_hot"]
LAYOUTS_4 = ["ep4_alltoall", "ep2_tp2_sp", "ep2_tp2_sp_alltoall", "ep2_pp2_vpp2_4_layers", "ep4_hot", "ep2_edp2_hot",
             "ep2_pp2_hot"]


@pytest.fixture(scope="module")
def single_process():
    return moe_checks.run()


@pytest.fixture(scope="module")
def single_process_4_layers():
    return moe_checks.run(layers=4)


@pytest.fixture(scope="module")
def single_process_hot_drops():
    return moe_checks.run(moe=moe_checks.HOT_DROPS)


@pytest.fixture(scope="module")
def moe_layouts():
    """layout -> per-rank results, from one 2-rank and one 4-rank launch."""
    runs = {}
    for n, target in ((2, "layouts_2"), (4, "layouts_4")):
        for result in run_on_ranks(n, f"tests/workers/moe_checks.py:{target}", timeout=1800):
            for layout, value in result.items():
                runs.setdefault(layout, []).append(value)
    return runs


def test_single_process_moe_run_trains_and_balances(single_process):
    losses = single_process["loss"]
    assert len(losses) == moe_checks.STEPS and losses[-1] < losses[0]
    for stats in single_process["moe_losses"]:
        assert set(stats) == {"load_balancing_loss", "z_loss"}
        assert 0.9 < stats["load_balancing_loss"] < 2.0  # 1 is perfect balance
    for tokens in single_process["tokens"]:
        assert sorted(tokens) == [0, 1]  # both layers are MoE
        assert all(sum(c) == 8 * 16 * 2 for c in tokens.values())  # global batch 8 x seq 16, top-2


@pytest.mark.parametrize("layout", LAYOUTS_2 + LAYOUTS_4)
def test_expert_parallel_layouts_give_the_single_process_run(request, moe_layouts, layout):
    single_process = request.getfixturevalue("single_process_4_layers" if layout.endswith("4_layers")
                                             else "single_process")
    results = moe_layouts[layout]
    last = [r for r in results if r["last_stage"]]
    assert last, layout
    for rank, result in enumerate(last):
        np.testing.assert_allclose(result["loss"], single_process["loss"], rtol=1e-5, err_msg=f"{layout} loss")
        np.testing.assert_allclose(result["grad_norm"], single_process["grad_norm"], rtol=1e-5,
                                   err_msg=f"{layout} gradient norm")
    for result in results:  # every rank reports the same reduced statistics
        for got, want in zip(result["moe_losses"], single_process["moe_losses"]):
            for name in want:
                assert abs(got[name] - want[name]) <= 1e-5 * abs(want[name]), (layout, name, got, want)
        assert result["tokens"] == single_process["tokens"], layout


@pytest.mark.parametrize("layout,full", [("resume_ep2", "ep2_allgather"), ("resume_ep2_to_ep1", "ep2_allgather"),
                                         ("resume_ep2_distopt_to_ep1", "ep2_distopt")])
def test_moe_checkpoints_resume_exactly_also_at_another_expert_parallel_size(moe_layouts, layout, full):
    """Saved with EP=2, resumed with EP=2 (bit-exact) or EP=1 (experts regathered from both expert-parallel
    ranks' directories, with their optimizer state; also through the distributed optimizer's shards)."""
    for result, uninterrupted in zip(moe_layouts[layout], moe_layouts[full]):
        if layout == "resume_ep2":
            assert result["resumed"] == uninterrupted["loss"]
        else:
            np.testing.assert_allclose(result["resumed"], uninterrupted["loss"], rtol=1e-6, err_msg=layout)


@pytest.mark.parametrize("layout,plain", [("ep2_hot", "ep2_alltoall"), ("ep4_hot", "ep4_alltoall")])
def test_hot_experts_send_fewer_all_to_all_bytes(moe_layouts, single_process, layout, plain):
    """The same model (above) with the hot experts' pairs kept off the all-to-all; their weights and gradients
    travel instead (counted apart). The monitor re-chose as the single-process run's counts say."""
    for hot, base in zip(moe_layouts[layout], moe_layouts[plain]):
        assert 0 < hot["traffic"]["all_to_all"] < base["traffic"]["all_to_all"], layout
        assert hot["traffic"]["hot_expert_sync"] > 0 and "hot_expert_sync" not in base["traffic"]
        assert hot["choices"] and hot["tokens"] == single_process["tokens"]


def test_hot_experts_with_drops_resume_exactly_after_a_rechoice(moe_layouts, single_process_hot_drops):
    """Cold experts at half the capacity: EP=2 gives the single-process losses and choices; the run stopped at
    iteration 1 saved its monitor's counts of iteration 1 and resumes to the same choice at iteration 2 and
    the same losses, bit for bit."""
    want = single_process_hot_drops
    assert want["choices"] and any(sum(k) < sum(r) for step in zip(want["kept"], want["tokens"])
                                   for k, r in zip(step[0].values(), step[1].values()))  # something was dropped
    for full, resumed in zip(moe_layouts["ep2_hot_drops"], moe_layouts["resume_ep2_hot_drops"]):
        np.testing.assert_allclose(full["loss"], want["loss"], rtol=1e-5)
        assert full["choices"] == want["choices"] and full["kept"] == want["kept"]
        assert resumed["resumed"] == full["loss"] and resumed["choices"] == full["choices"]
        saved = resumed["saved_callbacks"]["ColdHotExpertMonitor"]
        assert saved == {"hot": {"0": [0], "1": [0]}, "window": {str(l): want["tokens"][0][l] for l in (0, 1)}}
