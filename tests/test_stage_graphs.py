"""A pipeline stage keeps each in-flight micro-batch's forward graph (schedules.StageRunner): micro-batches
pulled back first-in-first-out, as 1F1B does, give bit for bit the gradients of the older path that re-runs
the forward at backward time, with the stage's forward run once per micro-batch instead of twice; with
compiled layers too. With dropout the older path drew new masks in its re-run (gradients
of a different forward than the one sent on); the kept graphs give bit for bit the gradients of each forward
differentiated at once. Single process: a middle stage (input from the previous stage, hidden states out)
and a first stage (tokens in). With recomputed cells MindSpore 2.10 pulls such graphs back wrongly, so the
Trainer keeps them only without recompute (stage_graphs_allowed)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from model_configs import make_config
from mindtron.legacy_model import GPTModel
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.pipeline_parallel.schedules import StageRunner, stage_graphs_allowed

MICRO, B = 3, 2


@pytest.fixture
def world_of_one():
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()


def run_stage(cfg, mode: str, first: bool):
    """Forward MICRO micro-batches through a stage without the loss head and pull back output gradients in
    the same order: (input grads, weight grads summed, forward calls). mode: "kept" (the default path),
    "recompute" (keep_graph off: forward now, re-run at backward time), "at_once" (each micro-batch's forward
    and backward in one gradient call, in order: the reference with dropout)."""
    tp.model_parallel_seed(5)
    model = GPTModel(cfg, pre_process=first, post_process=False)
    model.set_train(True)
    rng = np.random.default_rng(0)
    shape = (cfg.seq_length, B, cfg.hidden_size)
    batches = [{"tokens": Tensor(rng.integers(0, cfg.vocab_size, (B, cfg.seq_length)), ms.int32)}
               for _ in range(MICRO)]
    inputs = [None if first else Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(MICRO)]
    output_grads = [Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(MICRO)]
    calls = [0]

    def step(batch, x):
        calls[0] += 1
        if x is not None:
            model.set_input_tensor(x)
        return model(batch["tokens"], None, None)

    StageRunner.keep_graph = mode == "kept"
    try:
        runner = StageRunner(step, model.trainable_params(), 1.0)
    finally:
        StageRunner.keep_graph = True
    if mode == "at_once":
        results = [runner._recompute_backward(b, x, g) for b, x, g in zip(batches, inputs, output_grads)]
    else:
        held = [runner.forward_for_backward(b, x)[1] for b, x in zip(batches, inputs)]
        results = [runner.backward(h, g) for h, g in zip(held, output_grads)]
    input_grads = [None if gx is None else gx.asnumpy() for gx, _ in results]
    total = None
    for _, grads in results:
        grads = [g.asnumpy() for g in grads]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return input_grads, total, calls[0]


def assert_same(got, want, first):
    for a, b in zip(got[0], want[0]):
        assert (a is None) == (b is None) == first
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert len(got[1]) == len(want[1]) > 0
    for a, b in zip(got[1], want[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("first, options", [
    (False, {}),
    (True, dict(jit_layers=True)),
], ids=["middle", "first_jit"])
def test_kept_graphs_give_the_recomputed_gradients_bit_for_bit(world_of_one, first, options):
    cfg = make_config("gpt2", **{"jit_layers": False, **options})
    kept, recomputed = run_stage(cfg, "kept", first), run_stage(cfg, "recompute", first)
    assert_same(kept, recomputed, first)
    assert kept[2] == MICRO and recomputed[2] == 2 * MICRO  # one forward per micro-batch instead of two


@pytest.mark.parametrize("first, jit", [(False, False), (True, True)], ids=["middle", "first_jit"])
def test_kept_graphs_with_dropout_differentiate_the_forward_that_ran(world_of_one, first, jit):
    cfg = make_config("gpt2", hidden_dropout_rate=0.1, attention_dropout_rate=0.1, jit_layers=jit)
    kept = run_stage(cfg, "kept", first)
    assert_same(kept, run_stage(cfg, "at_once", first), first)
    assert kept[2] == MICRO


def test_stages_keep_graphs_only_without_recompute():
    assert stage_graphs_allowed(make_config("gpt2"))
    for options in (dict(recompute_granularity="full", recompute_method="uniform"),
                    dict(recompute_granularity="selective")):
        assert not stage_graphs_allowed(make_config("gpt2", **options))
    moe = make_config("gpt2")
    moe.moe_config.moe_layer_recompute = True
    assert not stage_graphs_allowed(moe)
