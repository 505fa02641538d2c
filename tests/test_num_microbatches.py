"""The batch-size schedules (constant, --rampup-batch-size, --step-batch-size-schedule) against hand
computations of Megatron's calculators: per-iteration global batch sizes, consumed samples, micro-batch
counts, sample-based iteration counts and the divisibility checks."""
import pytest

from mindtron.training.num_microbatches import build_batch_schedule, parse_step_schedule, train_iters_for_samples


def run(schedule, iterations):
    """(global batch, consumed samples after the iteration) for each iteration, as the training loop goes."""
    consumed, out = 0, []
    for _ in range(iterations):
        size = schedule.running_global_batch_size(consumed)
        consumed += size
        out.append((size, consumed))
    return out


def test_rampup_follows_megatrons_calculator_by_hand():
    # start 4, increment 2, 20 ramp samples, final 10: (10 - 4) / 2 = 3 increments of 20 / 3 samples each;
    # the batch is 4 + 2 * int(consumed / 6.67) until more than 20 samples are consumed, then 10.
    schedule = build_batch_schedule(10, 1, 2, rampup_batch_size=[4, 2, 20])
    assert run(schedule, 6) == [(4, 4), (4, 8), (6, 14), (8, 22), (10, 32), (10, 42)]
    assert [schedule.num_microbatches(c) for c in (0, 8, 14, 22)] == [2, 3, 4, 5]
    assert schedule.varies and schedule.global_batch_size == 10


def test_step_schedule_follows_megatron_019_by_hand():
    # thresholds in samples (no sequence length): 4 until 10 samples, 8 until 30, then 12
    schedule = build_batch_schedule(None, 2, 2, step_batch_size_schedule="10:8, 0:4 30:12")
    assert run(schedule, 7) == [(4, 4), (4, 8), (4, 12), (8, 20), (8, 28), (8, 36), (12, 48)]
    assert schedule.global_batch_size == 12
    # thresholds in tokens with a sequence length, suffixes K/M/B/T and fractions
    assert parse_step_schedule("0:16 2.4B:320 12B:1536", seq_length=2048) == \
        [(0, 16), (2_400_000_000 // 2048, 320), (12_000_000_000 // 2048, 1536)]
    assert parse_step_schedule("0:1K 1.5M:2k") == [(0, 1000), (1_500_000, 2000)]


def test_train_iters_for_sample_based_runs():
    step = build_batch_schedule(None, 2, 2, step_batch_size_schedule="0:4 10:8 30:12")
    assert train_iters_for_samples(step, 40) == 7  # 0.19: until the consumed samples reach 40 (48)
    ramp = build_batch_schedule(10, 1, 2, rampup_batch_size=[4, 2, 20])
    # 0.15: ramp iterations while consumed <= 20 (4, 8, 14, 22), then whole batches of 10: (40 - 22) // 10
    assert train_iters_for_samples(ramp, 40) == 4 + 1
    assert train_iters_for_samples(build_batch_schedule(8, 2, 2), 41) == 5


def test_divisibility_is_checked_when_the_batch_is_reached():
    schedule = build_batch_schedule(None, 2, 2, step_batch_size_schedule="0:4 8:6")
    assert schedule.num_microbatches(4) == 1
    with pytest.raises(ValueError, match=r"global batch size 6 \(after 8 consumed samples\) is not divisible"):
        schedule.num_microbatches(8)
    with pytest.raises(ValueError, match=r"global batch size \(10\) is not divisible by micro batch size \(2\)"):
        build_batch_schedule(10, 2, 2).num_microbatches(0)
    decreased = build_batch_schedule(10, 2, 2, decrease_batch_size_if_needed=True)
    assert decreased.running_global_batch_size(0) == 8 and decreased.current_global_batch_size(0) == 10


@pytest.mark.parametrize("kwargs,message", [
    ({"step_batch_size_schedule": "5:4 10:8"}, "the first threshold must be 0"),
    ({"step_batch_size_schedule": "0:4 10:8 10:16"}, "thresholds must increase strictly"),
    ({"step_batch_size_schedule": "0:4 10"}, "is not THRESHOLD:BATCH_SIZE"),
    ({"step_batch_size_schedule": "0:4 x:8"}, "threshold 'x' is not a number"),
    ({"step_batch_size_schedule": "0:0"}, "batch sizes must be positive"),
    ({"step_batch_size_schedule": "0:4", "decrease_batch_size_if_needed": True}, "exclude each other"),
    ({"rampup_batch_size": [4, 4, 100], "step_batch_size_schedule": "0:4"}, "exclude each other"),
    ({"rampup_batch_size": [4, 4]}, "takes 3 numbers"),
    ({"rampup_batch_size": [12, 2, 100]}, "start 12 exceeds --global-batch-size 10"),
    ({"rampup_batch_size": [4, 4, 100]}, r"\(6\) is not a multiple of the increment 4"),
])
def test_schedule_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_batch_schedule(10, 1, 2, **kwargs)
