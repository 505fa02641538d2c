"""Mock GPT data, the pretraining sampler and batch building."""
import numpy as np
import pytest

from mindtron.data.gpt_batch import make_gpt_batch
from mock_data import MockGPTDataset
from mindtron.data.samplers import MegatronPretrainingSampler


def test_mock_data_is_deterministic_counting_runs():
    a, b = MockGPTDataset(20, 16, 50, seed=3), MockGPTDataset(20, 16, 50, seed=3)
    assert len(a) == 20 and a[0]["text"].shape == (17,)
    np.testing.assert_array_equal(a[7]["text"], b[7]["text"])
    np.testing.assert_array_equal(a[0]["text"][-1], a[1]["text"][0])  # windows overlap by one token
    text = np.concatenate([a[i]["text"][:-1] for i in range(20)])
    nxt = text[1:][text[:-1] != 0]
    cur = text[:-1][text[:-1] != 0]
    follows = (nxt == cur + 1) | (nxt == 0) | ((cur == 49) & (nxt == 1))
    assert follows.all() and (text <= 49).all()
    with pytest.raises(IndexError):
        a[20]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_sampler_slices_are_disjoint_and_cover_the_global_batch(dp):
    per_rank = [list(MegatronPretrainingSampler(64, 0, 2, r, dp)) for r in range(dp)]
    steps = len(per_rank[0])
    assert all(len(p) == steps for p in per_rank) and steps == 64 // (2 * dp)
    for step in range(steps):
        together = sorted(i for r in range(dp) for i in per_rank[r][step])
        assert together == list(range(step * 2 * dp, (step + 1) * 2 * dp))


def test_sampler_resumes_from_consumed_samples():
    full = list(MegatronPretrainingSampler(40, 0, 2, 1, 2))
    resumed = list(MegatronPretrainingSampler(40, 12, 2, 1, 2))
    assert resumed == full[3:]
    with pytest.raises(ValueError, match="exhausted"):
        MegatronPretrainingSampler(40, 40, 2, 0, 2)


def test_gpt_batch_shifts_labels_and_builds_masks():
    text = np.array([[5, 6, 0, 7, 8]])
    batch = make_gpt_batch(text, eod=0, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 0, 7]])
    np.testing.assert_array_equal(batch["labels"], [[6, 0, 7, 8]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 0, 1]])
    np.testing.assert_array_equal(batch["position_ids"], [[0, 1, 2, 0]])
    assert batch["attention_mask"].shape == (1, 1, 4, 4) and batch["attention_mask"][0, 0, 3, 2]
