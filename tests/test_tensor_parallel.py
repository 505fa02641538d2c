"""Tensor-parallel layers: sharding and initialisation, cross entropy and RNG tracker in one process, and on
TP=2 and TP=4 (with and without sequence parallel) forward outputs and gradients against a dense reference."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from conftest import assert_all_close, worst_errors
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.tensor_parallel.initialization import ShardSpec, full_initial_value

CHECKS = ["output", "loss", "grad_input", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight",
          "grad_fc2_bias", "init_is_layout_independent"]
LM_CHECKS = ["loss", "logits", "grad_embedding", "grad_output_weight"]


def _required(sizes):
    names = []
    for size in sizes:
        for sp in ("", "_sp"):
            names += [f"tp{size}{sp}/mlp/{c}" for c in CHECKS] + [f"tp{size}{sp}/lm/{c}" for c in LM_CHECKS]
        names += [f"tp{size}/lm_label_smoothing/{c}" for c in LM_CHECKS]
        names += [f"tp{size}/gather_scatter/{c}" for c in ("gathered_output", "row_output", "grad_input")]
    return names


def test_tp2_matches_dense_reference(foundation_2):
    assert_all_close(worst_errors(foundation_2, "tp"), 1e-6, _required([2]))


def test_tp2_and_tp4_match_dense_reference(foundation_4):
    assert_all_close(worst_errors(foundation_4, "tp"), 1e-6, _required([2, 4]))


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_and_unshard_are_inverse(world, stride):
    full = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    specs = [ShardSpec((24, 5), 0, stride, world, r, None) for r in range(world)]
    shards = [s.shard(full) for s in specs]
    assert all(s.shape == (24 // world, 5) for s in shards)
    np.testing.assert_array_equal(specs[0].unshard(shards), full)
    if stride == 2 and world == 2:  # [gate; up] rows: each rank keeps half of each
        np.testing.assert_array_equal(shards[0], np.concatenate([full[0:6], full[12:18]]))


def test_initial_weights_do_not_depend_on_layout_or_creation_order():
    spec1 = ShardSpec((8, 4), 0, 1, 1, 0, tp.init_method_normal(0.02))
    spec2 = ShardSpec((8, 4), 0, 1, 2, 1, tp.init_method_normal(0.02))
    a = full_initial_value(spec1, 7, "layers.0.weight")
    np.random.default_rng(0).random(10)  # unrelated draws in between change nothing
    b = full_initial_value(spec2, 7, "layers.0.weight")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, full_initial_value(spec1, 7, "layers.1.weight"))
    assert not np.array_equal(a, full_initial_value(spec1, 8, "layers.0.weight"))
    assert abs(a.std() - 0.02) < 0.01


def test_single_rank_layers_match_dense_maths():
    ps.initialize_model_parallel()
    try:
        col = tp.ColumnParallelLinear(6, 10, init_method=tp.init_method_normal(1.0))
        tp.initialize_parameters(col, 3)
        x = np.random.default_rng(1).standard_normal((4, 2, 6)).astype(np.float32)
        y, bias = col(Tensor(x))
        assert bias is None  # added inside unless skip_bias_add
        np.testing.assert_allclose(y.asnumpy(), x @ col.weight.asnumpy().T + col.bias.asnumpy(), rtol=1e-5,
                                   atol=1e-6)
        skip = tp.ColumnParallelLinear(6, 10, skip_bias_add=True)
        _, bias = skip(Tensor(x))
        assert bias is skip.bias
        emb = tp.VocabParallelEmbedding(12, 6)
        tp.initialize_parameters(emb, 3)
        ids = np.array([[0, 5, 11]])
        np.testing.assert_array_equal(emb(Tensor(ids, ms.int32)).asnumpy(), emb.weight.asnumpy()[ids])
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_equals_numpy_softmax_cross_entropy(smoothing):
    ps.initialize_model_parallel()
    try:
        rng = np.random.default_rng(2)
        s, b, v = 5, 3, 11
        logits = (rng.standard_normal((s, b, v)) * 3).astype(np.float32)
        labels = rng.integers(0, v, (s, b))
        loss, grad = ms.value_and_grad(lambda z: tp.vocab_parallel_cross_entropy(z, Tensor(labels, ms.int32),
                                                                                 smoothing).sum())(Tensor(logits))
        z = logits.astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        onehot = np.eye(v)[labels]
        eps = smoothing * v / (v - 1)
        want = -((1 - eps) * (onehot * logp).sum(-1) + eps * logp.mean(-1))
        want_grad = np.exp(logp) - (1 - eps) * onehot - eps / v
        np.testing.assert_allclose(loss.asnumpy(), want.sum(), rtol=1e-6)
        np.testing.assert_allclose(grad.asnumpy(), want_grad, rtol=1e-5, atol=1e-6)
    finally:
        ps.destroy_model_parallel()


def test_cross_entropy_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match="label smoothing"):
        tp.vocab_parallel_cross_entropy(Tensor(np.zeros((1, 1, 4), np.float32)), Tensor([[0]]), 1.5)


def test_rng_tracker_forks_and_restores_masks():
    tp.model_parallel_seed(1234, tp_rank=0, ep_rank=0)
    tracker = tp.get_rng_tracker()
    x = Tensor(np.ones((64, 64), np.float32))
    saved = tracker.get_states()
    with tracker.fork():
        first = tp.dropout(x, 0.5).asnumpy()
    default_mask = tp.dropout(x, 0.5).asnumpy()
    tracker.set_states(saved)
    with tracker.fork():
        again = tp.dropout(x, 0.5).asnumpy()
    np.testing.assert_array_equal(first, again)  # same state -> same mask
    assert not np.array_equal(first, default_mask)  # the default stream is a different one
    assert set(np.unique(first)) <= {0.0, 2.0} and abs((first == 0).mean() - 0.5) < 0.05
    tp.model_parallel_seed(1234, tp_rank=1, ep_rank=0)
    with tp.get_rng_tracker().fork():
        other_rank = tp.dropout(x, 0.5).asnumpy()
    assert not np.array_equal(first, other_rank)  # tensor-parallel ranks drop different elements
    np.testing.assert_array_equal(tp.dropout(x, 0.5, training=False).asnumpy(), x.asnumpy())
    with pytest.raises(KeyError, match="not added"):
        with tracker.fork("no-such-state"):
            pass
