"""TransformerConfig.jit_layers: each transformer layer's maths compiled with mindspore.jit gives the losses
and gradients of the eager layers: with dropout (masks drawn outside the compiled graph, fresh every step),
full and selective recompute, every model option, fp16 compute, evaluation; and on 2 ranks under tensor and
sequence parallelism (collectives inside the compiled graph) and pipeline stages (GradOperation with a
sensitivity), see tests/workers/jit_checks.py."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from model_configs import make_config
from multiproc import run_on_ranks
from workers import jit_checks
from mindtron.legacy_model import GPTModel
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp

DROPOUT = dict(hidden_dropout_rate=0.2, attention_dropout_rate=0.2)


@pytest.fixture
def world_of_one():
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()


def losses_and_grads(cfg, steps=2):
    """Two training-mode steps' losses and gradients (new dropout masks each step), then an eval loss."""
    tp.model_parallel_seed(99)
    model = GPTModel(cfg)
    model.set_train(True)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        tokens = Tensor(rng.integers(0, cfg.vocab_size, (2, cfg.seq_length)), ms.int32)
        labels = Tensor(rng.integers(0, cfg.vocab_size, (2, cfg.seq_length)), ms.int32)
        loss, grads = ms.value_and_grad(lambda t, l: model(t, labels=l), None, model.trainable_params())(tokens, labels)
        out.append((float(loss), [g.asnumpy() for g in grads]))
    model.set_train(False)
    return out, float(model(tokens, labels=labels))


@pytest.mark.parametrize("name, options", [
    ("gpt2", DROPOUT),
    ("gpt2", dict(DROPOUT, recompute_granularity="full", recompute_method="uniform")),
    ("gpt2", dict(DROPOUT, recompute_granularity="selective")),
    ("llama", DROPOUT),
    ("options", {}),
    ("gptoss", DROPOUT),
    ("qwen", {}),
    ("gpt2", dict(compute_dtype="float16")),
])
def test_compiled_layers_give_the_eager_losses_and_gradients(world_of_one, name, options):
    (eager, eager_eval), (compiled, compiled_eval) = [losses_and_grads(make_config(name, jit_layers=jit, **options))
                                                      for jit in (False, True)]
    assert eager[0][0] != eager[1][0]  # the steps differ (and with dropout, so do their masks)
    tol = 2e-3 if "compute_dtype" in options else 1e-5
    for (loss_a, grads_a), (loss_b, grads_b) in zip(eager, compiled):
        assert loss_b == pytest.approx(loss_a, rel=tol)
        for a, b in zip(grads_a, grads_b):
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.abs(a).max())
    assert compiled_eval == pytest.approx(eager_eval, rel=tol)


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(2, "tests/workers/jit_checks.py:layouts", timeout=900)


@pytest.fixture(scope="module")
def single_process():
    return jit_checks.reference()


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2"])
def test_compiled_layers_under_tp_sp_and_pipeline_give_the_single_process_losses(two_ranks, single_process, layout):
    for rank, result in enumerate(two_ranks):
        if result[layout]["last_stage"]:
            np.testing.assert_allclose(result[layout]["loss"], single_process, rtol=1e-5, err_msg=f"rank {rank}")


def test_compiled_layers_with_tp_dropout_and_recompute_give_the_eager_losses(two_ranks):
    for result in two_ranks:
        np.testing.assert_allclose(result["tp2_dropout_recompute"]["compiled"],
                                   result["tp2_dropout_recompute"]["eager"], rtol=1e-5)
