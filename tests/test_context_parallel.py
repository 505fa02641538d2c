"""Context parallelism against the single-process run: ring (p2p), Ulysses (a2a), all-gather and the hybrid
(a2a+p2p), alone and with TP (+SP), PP and DP with the distributed optimizer. Model checks compare the loss
and every parameter's gradient (fp32, 1e-5 relative); training runs compare several iterations' losses and
gradient norms. One msrun launch per world size; the exhaustive matrix is marked slow."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from conftest import assert_all_close  # noqa: E402
from multiproc import run_on_ranks  # noqa: E402

WORKER = "tests/workers/context_parallel_checks.py"
LLAMA_GRADS = ["language_model.embedding.word_embeddings.weight",
               "language_model.encoder.layers.0.self_attention.query_key_value.weight",
               "language_model.encoder.layers.1.self_attention.dense.weight",
               "language_model.encoder.layers.0.input_norm.weight",
               "language_model.output_layer.weight"]


def split(per_rank):
    """(model-check errors, max over ranks; training runs: name -> per-rank results)."""
    errors, runs = {}, {}
    for result in per_rank:
        for name, value in result.items():
            if isinstance(value, dict):
                runs.setdefault(name, []).append(value)
            else:
                errors[name] = max(value, errors.get(name, 0.0))
    return errors, runs


def reference(steps=3, model_options=None):
    """The single-process training run the context-parallel ones must repeat."""
    from context_parallel_checks import cp_training_config
    from training_checks import train

    return train(cp_training_config(1, None, steps, model_options))


def assert_training_matches(runs: dict, name: str, ref: dict) -> None:
    last = [r for r in runs[name] if r["last_stage"]]
    assert last, f"{name}: no last-stage rank reported"
    for r in last:
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(r["grad_norm"], ref["grad_norm"], rtol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def quick():
    return split(run_on_ranks(2, f"{WORKER}:quick_2", timeout=900) + run_on_ranks(4, f"{WORKER}:quick_4", timeout=900))


@pytest.fixture(scope="module")
def plain_reference():
    return reference()


def test_every_algorithm_matches_the_single_process_model(quick):
    errors, _ = quick
    tags = ["llama/p2p2", "llama/a2a2", "llama/allgather2", "llama/p2p4", "llama/hybrid2x2", "llama/p2p2_tp2_sp"]
    required = [f"{t}/loss" for t in tags] + [f"{t}/grad/{g}" for t in tags for g in LLAMA_GRADS]
    required += ["gpt2/p2p2/no_mask/loss", "gpt2/p2p2/no_mask/grad/language_model.embedding.position_embeddings.weight"]
    # every parameter's gradient is compared: 15 in the Llama-style model, 28 in the GPT-2 one
    assert sum("/grad/" in n for n in errors) == 15 * len(tags) + 28
    assert_all_close(errors, 1e-5, required)


def test_training_with_context_parallel_repeats_the_single_process_run(quick, plain_reference):
    _, runs = quick
    for name in ("train/p2p2", "train/p2p2_dp2_distopt", "train/p2p2_pp2"):
        assert_training_matches(runs, name, plain_reference)


@pytest.mark.slow
def test_context_parallel_matrix():
    per_rank = run_on_ranks(2, f"{WORKER}:full_2", timeout=1800) + run_on_ranks(4, f"{WORKER}:full_4", timeout=1800)
    errors, runs = split(per_rank)
    tags = {n.split("/grad/")[0] for n in errors if "/grad/" in n}
    assert len(tags) == 18, sorted(tags)  # 13 model checks on 2 ranks (gpt2/p2p2/no_mask is in quick_2), 5 on 4
    assert_all_close(errors, 1e-5, [f"{t}/loss" for t in tags])
    from moe_checks import moe_options

    refs = {"plain": reference(), "moe": reference(model_options=moe_options()),
            "per_token": reference(model_options={"calculate_per_token_loss": True})}
    assert any("/moe/" in name for name in runs) and any("/per_token/" in name for name in runs)
    for name in (n for n in runs if n.startswith("train/")):
        kind = name.split("/")[1] if name.split("/")[1] in refs else "plain"
        assert_training_matches(runs, name, refs[kind])
    # attention dropout: recomputed layers replay the per-block masks, and the masks do change the loss
    for name in ("dropout/p2p2_selective", "dropout/p2p2_full"):
        assert_training_matches(runs, name, runs["dropout/p2p2"][0])
    assert not np.allclose(runs["dropout/p2p2"][0]["loss"], refs["plain"]["loss"], rtol=1e-5)
