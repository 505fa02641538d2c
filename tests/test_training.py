"""pretrain() end to end on a tiny GPT: the loss curve is the same for single-process, DP=2, TP=2 and TP=2 with
sequence parallel given the same global batch; resuming from a checkpoint repeats the uninterrupted run."""
import os
import re

import numpy as np
import pytest

from workers import training_checks

EVAL_AT = [3, 6]  # training_checks.layout_config(): validation after iterations 3 and 6


@pytest.fixture(scope="module")
def single_process():
    return training_checks.train(training_checks.layout_config())


def test_single_process_loss_falls(single_process):
    losses = single_process["loss"]
    assert len(losses) == training_checks.LAYOUT_STEPS and losses[-1] < losses[0] - 0.15
    assert all(n is not None and np.isfinite(n) for n in single_process["grad_norm"])


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2_sp", "pp2", "pp2_vpp2"])
def test_layouts_give_the_single_process_loss_curve(single_process, training_layouts_2, layout):
    for rank, result in enumerate(training_layouts_2):
        if not result[layout]["last_stage"]:
            continue  # the loss lives on the last pipeline stage
        got, want = np.array(result[layout]["loss"]), np.array(single_process["loss"])
        assert got.shape == want.shape, (rank, layout)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{layout} on rank {rank}")


@pytest.mark.parametrize("layout", ["pp3_uneven", "pp4", "pp2_dp2"])
def test_pipeline_layouts_on_3_and_4_ranks_give_the_single_process_loss_curve(single_process, training_layouts_3_4,
                                                                            layout):
    last = [r for r in training_layouts_3_4[layout] if r["last_stage"]]
    assert len(last) == (2 if layout == "pp2_dp2" else 1)  # one last stage per data-parallel replica
    for result in last:
        np.testing.assert_allclose(result["loss"], single_process["loss"], rtol=1e-5, err_msg=layout)


def test_evaluation_under_every_layout_gives_the_single_process_validation_loss(single_process, training_layouts_2,
                                                                                 training_layouts_3_4):
    want = single_process["eval"]
    assert [i for i, _ in want] == EVAL_AT
    runs = {layout: [r[layout] for r in training_layouts_2]
            for layout in ("dp2", "tp2", "tp2_sp", "pp2", "pp2_vpp2")}
    runs.update(training_layouts_3_4)
    for layout, per_rank in runs.items():
        for result in per_rank:
            if result["last_stage"]:
                assert [i for i, _ in result["eval"]] == EVAL_AT, layout
                np.testing.assert_allclose([l for _, l in result["eval"]], [l for _, l in want], rtol=1e-5,
                                           err_msg=layout)


def test_per_token_loss_under_dp2_and_pp2_gives_the_single_process_run(training_layouts_2):
    """--calculate-per-token-loss divides by the tokens of the whole global batch: DP=2 (counts summed over
    the replicas; gradients summed, not averaged, also when reduce-scattered for the distributed optimizer)
    and PP=2 (counted on the last stage, shared with the first) give one process's losses and validation
    losses, which differ from the per-micro-batch mean's."""
    want = training_checks.train(training_checks.per_token_config())
    mean = training_checks.train(training_checks.make_config(steps=4, dataset_options={"eod_mask_loss": True}))
    assert np.abs(np.array(want["loss"]) - mean["loss"]).max() > 1e-4
    assert [i for i, _ in want["eval"]] == [2, 4]
    for layout in ("dp2_per_token", "dp2_per_token_distopt", "pp2_per_token"):
        for rank, result in enumerate(training_layouts_2):
            if result[layout]["last_stage"]:
                np.testing.assert_allclose(result[layout]["loss"], want["loss"], rtol=1e-5, err_msg=f"{layout} {rank}")
                np.testing.assert_allclose([l for _, l in result[layout]["eval"]], [l for _, l in want["eval"]],
                                           rtol=1e-5, err_msg=layout)


def test_iterations_to_skip_drop_their_batches_without_a_step():
    """--iterations-to-skip 2: iteration 2's micro-batches are read and dropped, no update and no schedule
    step; iterations 1, 3, 4 then equal a 3-iteration run on the data without that batch."""
    from mock_data import MockGPTDataset

    data = MockGPTDataset(32, training_checks.SEQ, training_checks.VOCAB, seed=5)
    micro = [{"text": np.stack([data[2 * k]["text"], data[2 * k + 1]["text"]])} for k in range(16)]

    def run(batches, steps, skip=()):
        config = training_checks.make_config(steps=steps, eval_interval=None, iterations_to_skip=list(skip))
        config.optimizer_config.lr_decay_style, config.optimizer_config.lr_warmup_iters = "constant", 0
        return training_checks.train_on(config, batches)

    skipped = run(micro, 4, skip=[2])
    plain = run(micro[:4] + micro[8:], 3)  # 4 micro-batches per iteration: without iteration 2's
    assert len(skipped["loss"]) == 3
    np.testing.assert_array_equal(skipped["loss"], plain["loss"])


def test_pipeline_checkpoints_save_and_resume_per_stage(training_layouts_2):
    """PP=2: stopped after 2 of 4 iterations, saved per stage (mp_rank_00_000 / _001), resumed: the same
    losses and validation losses as the uninterrupted run."""
    result = [r["pp2_resume"] for r in training_layouts_2 if r["pp2_resume"]["last_stage"]]
    assert len(result) == 1
    np.testing.assert_array_equal(result[0]["resumed"], result[0]["full"])
    np.testing.assert_array_equal([l for _, l in result[0]["eval_resumed"]], [l for _, l in result[0]["eval_full"]])


@pytest.mark.parametrize("flags, message", [
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
     "--num-layers 3 should be divisible by --pipeline-model-parallel-size 2"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "number of layers per pipeline stage (2) must be divisible by --num-layers-per-virtual-pipeline-stage 3"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layer-list", "3,2"],
     "--num-layer-list"),
])
def test_invalid_pipeline_layouts_fail_with_clear_messages(flags, message):
    """(A micro-batch count that is not a multiple of the pipeline size is refused by the interleaved
    schedule itself: tests/test_pipeline.py.)"""
    from mindtron.training.arguments import parse_args
    base = ["--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "1", "--train-iters", "1"]
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(args=base + flags, world_size=2)


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


FP16_WEIGHTS = {"params_dtype": "float16", "compute_dtype": "float16", "embedding_init_dtype": "float16"}


def test_fp16_weights_are_stepped_through_fp32_main_copies():
    """--fp16 weights: the optimizer steps fp32 copies and rounds them into the model, so updates smaller
    than a float16 step accumulate instead of vanishing; the model holds the rounded copies."""
    from mindtron.parallel_core.optimizer import Float16Optimizer

    seen = {}

    def capture(trainer):
        opt = trainer.optimizer
        seen["type"] = type(opt)
        pairs = list(zip(opt.params, opt.main_params))
        seen["dtypes"] = {(str(p.dtype), str(m.dtype)) for p, m in pairs}
        seen["rounded"] = all(np.array_equal(p.asnumpy(), m.asnumpy().astype(np.float16)) for p, m in pairs)
        seen["finer"] = any(not np.array_equal(m.asnumpy(), p.asnumpy().astype(np.float32)) for p, m in pairs)

    config = training_checks.make_config(steps=4, fp16=True, loss_scale=1024.0, model_options=FP16_WEIGHTS)
    result = training_checks.train(config, on_finish=capture)
    assert seen["type"] is Float16Optimizer and seen["dtypes"] == {("Float16", "Float32")}
    assert seen["rounded"] and seen["finer"]
    assert all(np.isfinite(result["loss"])) and result["loss"][-1] < result["loss"][0]


def test_fp16_weights_resume_is_exact():
    """The checkpoint carries the fp32 main copies: the resumed run repeats the uninterrupted one."""
    result = training_checks.resume(steps=4, save_at=2, fp16=True, loss_scale=1024.0, model_options=FP16_WEIGHTS)
    np.testing.assert_array_equal(result["resumed"], result["full"])


def test_fp16_optimizer_state_into_fp32_weights_is_a_clear_error(tmp_path):
    training_checks.train(training_checks.make_config(steps=3, fp16=True, loss_scale=1024.0,
                                                      model_options=FP16_WEIGHTS, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="fp32 main copies of fp16/bf16 weights.*--no-load-optim"):
        training_checks.train(training_checks.make_config(steps=6, load_checkpoint=str(tmp_path)))


RAMP = {"rampup_batch_size": [2, 2, 12], "eval_interval": None}
# micro batch 2, one data-parallel rank, final batch 8: (8 - 2) / 2 = 3 increments of 12 / 3 = 4 samples;
# the batch is 2 + 2 * int(consumed / 4) until more than 12 samples are consumed.
RAMP_BATCHES = [2, 2, 4, 6, 8, 8]


def test_training_runs_through_a_batch_size_ramp(tmp_path):
    """Each iteration trains the ramp's batch, the sampler hands out exactly the consumed samples in order,
    the LR scheduler counts samples, a checkpoint is saved whenever the micro-batch count changes (as
    Megatron does), and a skipped iteration (--iterations-to-skip) reads its batch without training."""
    result = training_checks.train_recording(training_checks.make_config(steps=6, output_dir=str(tmp_path), **RAMP))
    assert result["batch"] == RAMP_BATCHES
    assert result["read"] == list(range(sum(RAMP_BATCHES)))  # 30 samples, in order, once each
    assert result["scheduler_steps"] == 30 and all(np.isfinite(result["loss"]))
    saved = sorted(int(d[len("iter_"):]) for d in os.listdir(tmp_path) if d.startswith("iter_"))
    assert saved == [2, 3, 4, 6]  # before iterations 3, 4, 5 (1 -> 2 -> 3 -> 4 micro-batches) and at the end
    skipping = training_checks.train_recording(training_checks.make_config(steps=6, iterations_to_skip=[5],
                                                                            **RAMP))
    assert skipping["batch"] == RAMP_BATCHES[:4] + RAMP_BATCHES[5:]  # iteration 5's 8 samples are dropped
    assert skipping["read"] == list(range(30)) and skipping["scheduler_steps"] == 30 - 8
    assert skipping["loss"][:4] == result["loss"][:4]


def test_resume_in_the_middle_of_a_ramp_is_exact():
    """Stopped after iteration 3 (batch 4 of the ramp) and resumed: the consumed samples from the
    checkpoint put the ramp, the sampler and the LR schedule where they were."""
    result = training_checks.resume(steps=6, save_at=3, **RAMP)
    np.testing.assert_array_equal(result["resumed"], result["full"])


def test_step_schedule_equal_to_the_ramp_trains_the_same():
    """--step-batch-size-schedule thresholds are tokens (divided by the sequence length, 16): this schedule
    is the ramp above, so the two runs train the same batches and losses."""
    steps = training_checks.train_recording(training_checks.make_config(
        steps=6, eval_interval=None, step_batch_size_schedule="0:2 64:4 128:6 208:8"))
    ramp = training_checks.train_recording(training_checks.make_config(steps=6, **RAMP))
    assert steps["batch"] == RAMP_BATCHES and steps["read"] == ramp["read"]
    np.testing.assert_array_equal(steps["loss"], ramp["loss"])
