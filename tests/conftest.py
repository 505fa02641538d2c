"""Shared fixtures: one msrun launch per world size runs every foundation check (launches are slow on CPU)."""
import math
from typing import Optional

import pytest

from multiproc import run_on_ranks


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (exhaustive matrices, long documentation commands)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: exhaustive or long; run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

FOUNDATION = "tests/workers/foundation_checks.py:main"


@pytest.fixture(scope="session")
def foundation_2():
    """Per-rank results of tests/workers/foundation_checks.py on 2 ranks."""
    return run_on_ranks(2, FOUNDATION, timeout=600)


@pytest.fixture(scope="session")
def foundation_4():
    """Per-rank results of tests/workers/foundation_checks.py on 4 ranks."""
    return run_on_ranks(4, FOUNDATION, timeout=900)


def worst_errors(per_rank: list, section: Optional[str] = None) -> dict:
    """check name -> largest relative error over all ranks (in `section` of each rank's result, if given);
    a NaN error counts as inf, so that no later rank's value can hide it."""
    worst: dict = {}
    for result in per_rank:
        for name, err in (result if section is None else result[section]).items():
            worst[name] = max(math.inf if math.isnan(err) else err, worst.get(name, 0.0))
    return worst


def assert_all_close(errors: dict, tol: float, required: list, tol_for=lambda name: None) -> None:
    """Every check within `tol` (or `tol_for(name)` where that is set), and every `required` check present."""
    missing = [name for name in required if name not in errors]
    assert not missing, f"checks that did not run: {missing}"
    bad = {n: e for n, e in errors.items() if not e <= (tol_for(n) or tol)}
    assert not bad, f"checks outside tolerance {tol}: {bad}"


@pytest.fixture(scope="session")
def model_checks_2():
    """Per-rank results of tests/workers/model_checks.py on 2 ranks."""
    return run_on_ranks(2, "tests/workers/model_checks.py:main", timeout=600)


@pytest.fixture(scope="session")
def training_layouts_2():
    """Per-rank loss histories of DP=2, TP=2 and TP=2+SP training runs on 2 ranks."""
    return run_on_ranks(2, "tests/workers/training_checks.py:layouts", timeout=900)


@pytest.fixture(scope="session")
def training_layouts_3_4():
    """pretrain() on 3 ranks (PP=3 uneven) and 4 ranks (PP=4, PP=2 x DP=2), keyed by layout name."""
    runs = {}
    for n in (3, 4):
        for rank, result in enumerate(run_on_ranks(n, f"tests/workers/training_checks.py:layouts_{n}", timeout=900)):
            for layout, value in result.items():
                runs.setdefault(layout, []).append(value)
    return runs


@pytest.fixture(scope="session")
def pipeline_checks():
    """Per-rank results of tests/workers/pipeline_checks.py on 2, 3 and 4 ranks."""
    return {n: run_on_ranks(n, "tests/workers/pipeline_checks.py:main", timeout=600) for n in (2, 3, 4)}
