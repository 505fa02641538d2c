"""Training-step options of Megatron-Core core_r0.19.0 in one process: --calculate-per-token-loss (the step's
update and reported loss against a closed form, evaluation, Megatron-Core style loss functions) and
--decoupled-lr through the training step (plain and distributed optimizer). The per-token loss under DP=2
and PP=2 is in test_training.py (2-rank launch)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from model_configs import make_config
from mindtron.legacy_model import GPTModel
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.training.config import AllConfig, OptimizerConfig, TrainingConfig
from mindtron.training.training import Trainer

LR = 0.5


@pytest.fixture(autouse=True)
def world_of_one():
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()


def micro_batches(cfg, n=2, b=2):
    """Micro-batches whose loss masks keep different numbers of tokens (so per-token and per-micro-batch
    means differ)."""
    rng = np.random.default_rng(11)
    out = []
    for k in range(n):
        tokens = rng.integers(0, cfg.vocab_size, (b, cfg.seq_length))
        mask = np.ones(tokens.shape, np.float32)
        mask[:, : 3 + 6 * k] = 0.0  # 26 tokens kept in the first, 14 in the second
        out.append({"tokens": tokens.astype(np.int32), "labels": np.roll(tokens, -1, 1).astype(np.int32),
                    "loss_mask": mask})
    return out


def all_config(model_config, **optimizer):
    return AllConfig(model_config=model_config,
                     training_config=TrainingConfig(micro_batch_size=2, global_batch_size=4, training_iters=1),
                     optimizer_config=OptimizerConfig(**{"optimizer_type": "sgd", "learning_rate": LR,
                                                         "sgd_momentum": 0.0, "weight_decay": 0.0,
                                                         "clip_grad": 0.0, "lr_decay_style": "constant",
                                                         **optimizer}))


def one_step(model_config, batches, **optimizer):
    """(parameters before, after one training step, reported loss, model)."""
    tp.model_parallel_seed(7)
    model = GPTModel(model_config)
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params()}
    trainer = Trainer(model, all_config(model_config, **optimizer))
    result = trainer.train_step(iter(batches))
    after = {p.name: p.asnumpy() for p in model.trainable_params()}
    return before, after, result.loss, trainer


def expected_gradients(model_config, batches, per_token: bool):
    """Gradients of the objective written out: sum over micro-batches of the masked sums over the global
    token count (per-token), or the mean over micro-batches of each micro-batch's masked mean."""
    tp.model_parallel_seed(7)
    model = GPTModel(model_config)  # same seed and names: the same starting weights
    params = model.trainable_params()
    tokens = sum(float(b["loss_mask"].sum()) for b in batches)

    def objective():
        total = 0.0
        for b in batches:
            mask = Tensor(b["loss_mask"])
            loss = model(Tensor(b["tokens"]), labels=Tensor(b["labels"]), loss_mask=mask)  # masked mean
            total = total + (loss * mask.sum() / tokens if per_token else loss / len(batches))
        return total

    loss, grads = ms.value_and_grad(objective, None, params)()
    return float(loss), {p.name: g.asnumpy() for p, g in zip(params, grads)}


@pytest.mark.parametrize("per_token", [False, True])
def test_per_token_loss_step_matches_the_closed_form(per_token):
    batches = micro_batches(make_config("llama"))
    before, after, reported, _ = one_step(make_config("llama", calculate_per_token_loss=per_token), batches)
    want_loss, grads = expected_gradients(make_config("llama"), batches, per_token)
    assert reported == pytest.approx(want_loss, rel=1e-5)
    for name, grad in grads.items():
        # atol: the difference of two fp32 weights near 1 (norm weights) carries ~1e-7 of round-off
        np.testing.assert_allclose(before[name] - after[name], LR * grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_per_token_loss_is_a_different_objective():
    """The micro-batches keep 26 and 14 tokens: weights 26/40, 14/40 instead of 1/2, 1/2."""
    batches = micro_batches(make_config("llama"))
    _, mean = expected_gradients(make_config("llama"), batches, False)
    _, per_token = expected_gradients(make_config("llama"), batches, True)
    name = "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"
    assert np.abs(mean[name] - per_token[name]).max() > 0.05 * np.abs(mean[name]).max()


def test_per_token_evaluation_and_megatron_core_loss_functions():
    """Evaluation reports summed losses over summed tokens; a forward step whose loss_func returns
    Megatron-Core's (loss sum, tokens, report) gives the same step as GPTModel's own loss."""
    cfg = make_config("llama", calculate_per_token_loss=True)
    batches = micro_batches(cfg)
    tp.model_parallel_seed(7)
    model = GPTModel(cfg)
    trainer = Trainer(model, all_config(cfg))
    evaluated = trainer.evaluate(iter(batches), eval_iters=1)
    mean_cfg = make_config("llama")
    tp.model_parallel_seed(7)
    reference = GPTModel(mean_cfg)
    sums = [float(reference(Tensor(b["tokens"]), labels=Tensor(b["labels"]), loss_mask=Tensor(b["loss_mask"]))
                  .asnumpy()) * float(b["loss_mask"].sum()) for b in batches]
    assert evaluated == pytest.approx(sum(sums) / sum(float(b["loss_mask"].sum()) for b in batches), rel=1e-5)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        mask = Tensor(b["loss_mask"])
        out = model(Tensor(b["tokens"]), labels=Tensor(b["labels"]), loss_mask=mask)  # the masked sum

        def loss_func(output):
            return output, mask.sum(), {"lm loss": output}
        return out, loss_func

    results = []
    for step_func in (None, forward_step):
        tp.model_parallel_seed(7)
        model = GPTModel(cfg)
        trainer = Trainer(model, all_config(cfg), forward_step_func=step_func)
        results.append((trainer.train_step(iter(batches)).loss, [p.asnumpy() for p in model.trainable_params()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_megatron_core_loss_function_without_per_token_loss_is_a_mean():
    """Megatron-Core's loss_func returns (sum, tokens, report) and its schedule divides by the tokens: the
    same update as GPTModel's masked mean."""
    cfg = make_config("llama")
    batches = micro_batches(cfg)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        mask = Tensor(b["loss_mask"])
        mean = model(Tensor(b["tokens"]), labels=Tensor(b["labels"]), loss_mask=mask)
        return mean, lambda output: (output * mask.sum(), mask.sum(), {})

    outcomes = []
    for step_func in (None, forward_step):
        tp.model_parallel_seed(7)
        model = GPTModel(cfg)
        loss = Trainer(model, all_config(cfg), forward_step_func=step_func).train_step(iter(batches)).loss
        outcomes.append((loss, [p.asnumpy() for p in model.trainable_params()]))
    assert outcomes[0][0] == pytest.approx(outcomes[1][0], rel=1e-6)
    for a, b in zip(outcomes[0][1], outcomes[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("distributed", [False, True])
def test_decoupled_lr_moves_embedding_and_output_layer_at_their_own_rate(distributed):
    """SGD, constant schedule: the word embedding and the untied output layer step with --decoupled-lr, the
    rest with --lr (also through the distributed optimizer's main pieces)."""
    cfg = make_config("llama")
    batches = micro_batches(cfg)
    _, grads = expected_gradients(cfg, batches, False)
    tp.model_parallel_seed(7)
    model = GPTModel(cfg)
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params()}
    config = all_config(cfg, decoupled_lr=0.05)
    config.training_config.use_distributed_optimizer = distributed
    Trainer(model, config).train_step(iter(batches))
    special = {"language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"}
    for p in model.trainable_params():
        lr = 0.05 if p.name in special else LR
        np.testing.assert_allclose(before[p.name] - p.asnumpy(), lr * grads[p.name], rtol=1e-4,
                                   atol=1e-6, err_msg=p.name)
