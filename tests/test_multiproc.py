"""The msrun test harness itself: a failing rank fails the launch with its traceback; a worker that dies on
exit after every rank returned is a warning, with the results kept; the per-rank errors merge to the worst."""
import math

import pytest

from conftest import assert_all_close, worst_errors
from multiproc import run_on_ranks

WORKER = "tests/workers/harness_checks.py"
QUICK = {"MS_NODE_TIMEOUT": "5"}  # the scheduler gives up on the dead worker after 5 s instead of 30


def test_a_worker_dying_on_exit_is_a_warning_and_the_results_are_kept():
    with pytest.warns(RuntimeWarning, match=r"after every rank returned its result[\s\S]*Segmentation fault"):
        assert run_on_ranks(2, f"{WORKER}:dies_on_exit", timeout=300, env=QUICK) == [0, 1]


def test_a_failing_rank_fails_the_launch_with_its_traceback():
    with pytest.raises(AssertionError, match=r"----- rank 1 [\s\S]*rank 1 fails on purpose"):
        run_on_ranks(2, f"{WORKER}:fails_on_rank_1", timeout=300, env=QUICK)


def test_the_worst_error_over_ranks_keeps_a_nan():
    per_rank = [{"a": float("nan"), "b": 1e-7}, {"a": 0.0, "b": 2e-7}]
    worst = worst_errors(per_rank)
    assert worst == {"a": math.inf, "b": 2e-7}
    with pytest.raises(AssertionError, match="outside tolerance"):
        assert_all_close(worst, 1e-5, ["a", "b"])
    assert worst_errors([{"tp": {"c": 3e-6}}, {"tp": {"c": 1e-6}}], "tp") == {"c": 3e-6}
