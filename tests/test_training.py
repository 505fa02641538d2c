"""pretrain() end to end on a tiny GPT: the loss curve is the same for single-process, DP=2, TP=2 and TP=2 with
sequence parallel given the same global batch; resuming from a checkpoint repeats the uninterrupted run."""
import numpy as np
import pytest

from workers import training_checks


@pytest.fixture(scope="module")
def single_process():
    return training_checks.train(training_checks.make_config(steps=10))


def test_single_process_loss_falls(single_process):
    losses = single_process["loss"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.3
    assert all(n is not None and np.isfinite(n) for n in single_process["grad_norm"])


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2_sp", "pp2", "pp2_vpp2"])
def test_layouts_give_the_single_process_loss_curve(single_process, training_layouts_2, layout):
    for rank, result in enumerate(training_layouts_2):
        if not result[layout]["last_stage"]:
            continue  # the loss lives on the last pipeline stage
        got, want = np.array(result[layout]["loss"]), np.array(single_process["loss"])
        assert got.shape == want.shape, (rank, layout)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{layout} on rank {rank}")


@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2"])
def test_tied_embedding_copies_stay_equal(training_layouts_2, layout):
    first, last = training_layouts_2[0][layout]["tied"], training_layouts_2[1][layout]["tied"]
    (name_first, embedding), = [(n, w) for n, w in first.items() if n.endswith("embedding.word_embeddings.weight")]
    (name_last, head_copy), = [(n, w) for n, w in last.items() if n.endswith("word_embeddings_for_head.weight")]
    np.testing.assert_array_equal(embedding, head_copy)


def test_resume_is_exact():
    result = training_checks.resume(steps=12, save_at=6)
    np.testing.assert_array_equal(result["resumed"], result["full"])


def test_overflowing_steps_are_skipped_and_the_scale_backs_off():
    """fp16 compute with a huge initial loss scale: the first steps overflow and are skipped (no update, no
    schedule step) until hysteresis and backoff bring the scale down; then training proceeds."""
    config = training_checks.make_config(steps=10, fp16=True, loss_scale_value=2.0 ** 24, loss_scale_factor=1)
    config.model_config.compute_dtype = "float16"
    result = training_checks.train(config)
    skipped = result["skipped"]
    assert skipped[0] and not skipped[-1], skipped
    assert all(np.isfinite(result["loss"]))
    assert all(n is None for n, s in zip(result["grad_norm"], skipped) if s)  # no update happened
