"""MoE under expert parallelism: every layout trains the single-process MoE GPT's loss curve with the same
gradient norms, auxiliary losses and token counts (EP=2 and EP=4, allgather vs alltoall dispatcher, grouped
experts, the distributed optimizer, EP with TP + sequence parallel, expert tensor parallel 1, EP x PP)."""
import numpy as np
import pytest

from multiproc import run_on_ranks
from workers import moe_checks

LAYOUTS_2 = ["ep2_allgather", "ep2_alltoall", "ep2_grouped", "ep2_distopt", "tp2_sp_ep2_etp1"]
LAYOUTS_4 = ["ep4_alltoall", "ep2_tp2_sp", "ep2_tp2_sp_alltoall", "ep2_pp2_vpp2_4_layers"]


@pytest.fixture(scope="module")
def single_process():
    return moe_checks.run()


@pytest.fixture(scope="module")
def single_process_4_layers():
    return moe_checks.run(layers=4)


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
