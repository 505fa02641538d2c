"""Mixture of Experts in one process: the router against hand computations in numpy (top-k, scores,
capacity and drop policies, auxiliary and z losses and how they reach the backward), the whole GPT with MoE
layers against the independent numpy reference, loop vs grouped experts, starved experts, config errors."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from model_configs import batch, loss_and_grads, make_config
from numerics import rel_err
from reference_gpt import reference_logits, reference_loss
import reference_moe as ref
from mindtron.legacy_model import GPTModel
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe import (MoEConfig, TopKRouter, get_moe_metrics_tracker, parse_moe_layer_freq,
                                        set_aux_loss_backward_scale, update_expert_bias)
from mindtron.parallel_core.moe.router import capacity_mask, expert_capacity


@pytest.fixture(autouse=True)
def world_of_one():
    ps.initialize_model_parallel()
    tp.model_parallel_seed(1234)
    get_moe_metrics_tracker().clear()
    set_aux_loss_backward_scale(1.0)
    yield
    ps.destroy_model_parallel()


def router_for(moe: MoEConfig, hidden=8, seed=0, bias=False):
    cfg = make_config("llama", hidden_size=hidden, num_attention_heads=2, num_query_groups=1,
                      add_bias_linear=bias, moe_config=moe)
    router = TopKRouter(cfg, cfg.moe_config, layer_number=1)
    router.set_train(True)
    rng = np.random.default_rng(seed)
    ms.ops.assign(router.weight, Tensor(rng.normal(0, 0.5, router.weight.shape).astype(np.float32)))
    return router


def route(router, x):
    with tp.forward_pass():
        probs, routing_map = router(Tensor(x.astype(np.float32)))
    return probs.asnumpy(), routing_map


def hidden_states(s=6, b=2, h=8, seed=1):
    return np.random.default_rng(seed).normal(size=(s, b, h)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------------
ROUTERS = {
    "softmax_top2": dict(num_experts=4, moe_router_topk=2),
    "pre_softmax_top1": dict(num_experts=4, moe_router_topk=1, moe_router_pre_softmax=True),
    "sigmoid_top2_scaled": dict(num_experts=6, moe_router_topk=2, moe_router_score_function="sigmoid",
                                moe_router_topk_scaling_factor=2.5),
    "sqrtsoftplus_top3": dict(num_experts=6, moe_router_topk=3, moe_router_score_function="sqrtsoftplus"),
    "group_limited": dict(num_experts=8, moe_router_topk=2, moe_router_num_groups=4, moe_router_group_topk=2,
                          moe_router_score_function="sigmoid"),
    "capacity_probs": dict(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.5),
    "capacity_position": dict(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.5,
                              moe_token_drop_policy="position"),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_choice_and_weights_match_numpy(name):
    moe = MoEConfig(**ROUTERS[name])
    router = router_for(moe)
    router.set_train(False)
    x = hidden_states()
    probs, routing_map = route(router, x)
    logits = x.reshape(-1, 8).astype(np.float64) @ router.weight.asnumpy().T
    want_probs, routed, kept = ref.route(router.moe, logits)
    np.testing.assert_array_equal(routing_map, kept)
    assert rel_err(probs, want_probs) < 1e-6
    assert (routing_map.sum(1) <= moe.moe_router_topk).all()


def test_capacity_and_drop_policies_by_hand():
    # 4 tokens, 2 experts, top-1: expert 0 gets tokens 0, 1, 3 with weights 0.6, 0.9, 0.7; capacity 2.
    probs = np.array([[0.6, 0.0], [0.9, 0.0], [0.0, 0.8], [0.7, 0.0]])
    routed = probs > 0
    assert expert_capacity(4, 2, 1, 1.0) == 2 and expert_capacity(5, 4, 2, 1.1) == 3
    by_probs = capacity_mask(probs, routed, 2, "probs") & routed
    by_position = capacity_mask(probs, routed, 2, "position") & routed
    np.testing.assert_array_equal(by_probs[:, 0], [False, True, False, True])     # 0.9 and 0.7 stay
    np.testing.assert_array_equal(by_position[:, 0], [True, True, False, False])  # the first two stay
    np.testing.assert_array_equal(by_probs[:, 1], routed[:, 1])
    assert capacity_mask(probs, routed, 5, "probs").all()  # capacity above the token count: nothing dropped


def test_padding_to_capacity_changes_nothing_but_the_rows_computed():
    x = hidden_states(s=8)
    base = MoEConfig(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.75)
    padded = MoEConfig(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.75,
                       moe_pad_expert_input_to_capacity=True)
    p1, m1 = route(router_for(base), x)
    p2, m2 = route(router_for(padded), x)
    np.testing.assert_array_equal(p1, p2)
    capacity = expert_capacity(16, 4, 2, 0.75)
    assert (m2.sum(0) == capacity).all() and (m1 <= m2).all()  # every expert padded to its capacity


def test_aux_z_and_seq_losses_are_recorded_with_megatrons_values():
    s, b = 6, 2
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                    moe_aux_loss_coeff=[0.01, 0.02], moe_z_loss_coeff=0.003)
    router = router_for(moe)
    x = hidden_states(s=s, b=b)
    route(router, x)
    logits = x.reshape(-1, 8).astype(np.float64) @ router.weight.asnumpy().T
    stats = get_moe_metrics_tracker().report(router.moe.tracked_losses(), num_layers=2, moe_layers=1,
                                             loss_scale=1.0)
    want = {"load_balancing_loss": ref.aux_loss(moe, logits, 1.0),
            "seq_load_balancing_loss": ref.seq_aux_loss(moe, logits, s, b, 1.0),
            "z_loss": ref.z_loss(logits, 1.0)}
    for name, value in want.items():
        assert abs(stats.losses[name] - value) / value < 1e-5, (name, stats.losses[name], value)
        assert stats.per_layer[name][1] == 0.0  # layer 2 recorded nothing
    # hand check of the aux-loss formula on a tiny case: E=2, k=1, two tokens both routed to expert 0
    scores = np.array([[0.75, 0.25], [0.6, 0.4]])
    counts = np.array([2, 0])
    assert math.isclose(2 * 1.0 / (1 * 2 * 2) * (scores.sum(0) * counts).sum(), 1.35)


def test_auxiliary_losses_enter_the_backward_exactly():
    """With a loss that ignores the router's weights, the router's weight gradient is exactly the gradient
    of coeff-scaled aux + z losses times the backward scale (checked by central differences in float64)."""
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.05)
    router = router_for(moe)
    x = hidden_states()
    set_aux_loss_backward_scale(0.5)

    def f():
        with tp.forward_pass():
            probs, _ = router(Tensor(x))
        return (probs * 0.0).sum()

    grad = ms.grad(f, None, [router.weight])()[0].asnumpy()
    flat = x.reshape(-1, 8).astype(np.float64)

    def total(w):
        logits = flat @ w.T
        return 0.5 * (ref.aux_loss(moe, logits, 0.1) + ref.z_loss(logits, 0.05))

    w0 = router.weight.asnumpy().astype(np.float64)
    numeric = np.zeros_like(w0)
    for i in np.ndindex(*w0.shape):
        step = np.zeros_like(w0)
        step[i] = 1e-6
        numeric[i] = (total(w0 + step) - total(w0 - step)) / 2e-6
    assert rel_err(grad, numeric) < 1e-3


def test_sinkhorn_routes_balanced_in_training_and_by_activation_in_eval():
    moe = MoEConfig(num_experts=4, moe_router_topk=1, moe_router_load_balancing_type="sinkhorn")
    router = router_for(moe)
    x = hidden_states(s=16)
    router.set_train(True)
    _, train_map = route(router, x)
    router.set_train(False)
    probs, eval_map = route(router, x)
    logits = x.reshape(-1, 8).astype(np.float64) @ router.weight.asnumpy().T
    np.testing.assert_array_equal(eval_map.argmax(1), logits.argmax(1))
    assert rel_err(probs.max(1), 1 / (1 + np.exp(-logits.max(1)))) < 1e-6  # top-1: sigmoid of the chosen logit
    assert np.bincount(train_map.argmax(1), minlength=4).max() <= np.bincount(eval_map.argmax(1), minlength=4).max()


def test_expert_bias_steers_the_choice_and_moves_towards_balance():
    moe = MoEConfig(num_experts=4, moe_router_topk=1, moe_router_score_function="sigmoid",
                    moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.1)
    router = router_for(moe)
    x = hidden_states(s=16)
    _, before = route(router, x)
    counts = before.sum(0)
    update_expert_bias([router], 0.1)
    bias = router.expert_bias.asnumpy()
    np.testing.assert_allclose(bias, np.sign(counts.mean() - counts) * 0.1, atol=1e-7)
    assert (router.local_tokens_per_expert == 0).all()  # counted afresh each iteration
    ms.ops.assign(router.expert_bias, Tensor(np.array([5.0, 0, 0, 0], np.float32)))
    router.reset_step_statistics()
    _, steered = route(router, x)
    assert steered[:, 0].all()  # a large bias on expert 0 takes every token, weights stay the sigmoid's
    assert router.expert_bias.requires_grad is False


def test_moe_layer_freq_forms():
    assert parse_moe_layer_freq("([0]+[1]*3)") == [0, 1, 1, 1]
    assert parse_moe_layer_freq("([1]*2+[0]*1)*2") == [1, 1, 0, 1, 1, 0]
    assert parse_moe_layer_freq("2") == 2 and parse_moe_layer_freq(3) == 3
    assert MoEConfig(num_experts=2, moe_layer_freq=2).layer_pattern(4) == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="moe-layer-freq"):
        parse_moe_layer_freq("__import__('os')")
    with pytest.raises(ValueError, match="moe-layer-freq"):
        parse_moe_layer_freq("[0, 2]")


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------
MODELS = {
    # Mixtral-like: RMSNorm, RoPE, GQA, SwiGLU experts, softmax top-2, every layer MoE
    "mixtral": ("llama", dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.01)),
    # DeepSeek-like: first layer dense, sigmoid scores with expert bias, group-limited, shared expert with gate
    "deepseek": ("llama", dict(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16, moe_layer_freq="([0]+[1])",
                               moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                               moe_router_num_groups=4, moe_router_group_topk=2,
                               moe_router_topk_scaling_factor=1.5, moe_shared_expert_intermediate_size=32,
                               moe_shared_expert_gate=True)),
    # GPT-2 style with biases in the experts and the router, every other layer, capacity with drops
    "gpt2_capacity": ("gpt2", dict(num_experts=4, moe_router_topk=2, moe_layer_freq=2, moe_expert_capacity_factor=0.6,
                                   moe_token_drop_policy="position", moe_z_loss_coeff=1e-3)),
}


def moe_model(name, **moe_overrides):
    base, moe = MODELS[name]
    return GPTModel(make_config(base, moe_config=MoEConfig(**{**moe, **moe_overrides})))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_moe_gpt_logits_and_loss_match_numpy_reference(name):
    model = moe_model(name)
    cfg = model.config
    tokens, labels = batch(cfg)
    params = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    model.set_train(False)
    logits = model(Tensor(tokens, ms.int32)).asnumpy()
    want = reference_logits(cfg, params, tokens)
    assert rel_err(logits, want) < 1e-5
    model.set_train(True)
    loss = model(Tensor(tokens, ms.int32), labels=Tensor(labels, ms.int32)).asnumpy()
    assert abs(loss - reference_loss(want, labels)) / reference_loss(want, labels) < 1e-5  # lm loss only


def test_moe_parameter_names_and_shapes():
    model = moe_model("deepseek")
    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    layer = "language_model.encoder.layers.1.mlp."
    assert shapes[layer + "router.weight"] == (8, 32) and shapes[layer + "router.expert_bias"] == (8,)
    assert shapes[layer + "experts.dense_h_to_4h.weight"] == (8, 32, 32)   # [E, 2 x moe_ffn, h]
    assert shapes[layer + "experts.dense_4h_to_h.weight"] == (8, 32, 16)   # [E, h, moe_ffn]
    assert shapes[layer + "shared_experts.dense_h_to_4h.weight"] == (64, 32)
    assert shapes[layer + "shared_experts.gate_weight"] == (1, 32)
    assert "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight" in shapes  # the first layer is dense
    expert = dict(model.parameters_and_names())[layer + "experts.dense_h_to_4h.weight"]
    router_weight = dict(model.parameters_and_names())[layer + "router.weight"]
    assert expert.allreduce is False and getattr(router_weight, "allreduce", True)


@pytest.mark.parametrize("name", ["mixtral", "gpt2_capacity"])
def test_grouped_experts_equal_the_loop(name):
    loop, grouped = moe_model(name), moe_model(name, moe_grouped_gemm=True)
    tokens, labels = batch(loop.config)
    l1, g1 = loss_and_grads(loop, tokens, labels)
    l2, g2 = loss_and_grads(grouped, tokens, labels)
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    for key in g1:
        assert rel_err(g2[key], g1[key]) < 1e-5, key


@pytest.mark.parametrize("grouped,safe", [(False, False), (True, False), (True, True)])
def test_starved_experts_never_fail_the_step(grouped, safe):
    """A router forced to send every token to experts 0 and 1 leaves experts 2 and 3 empty: the step runs, their
    gradients are zero, and safe tokens change nothing but the rows the grouped computation sees."""
    model = moe_model("mixtral", moe_grouped_gemm=grouped, enable_gmm_safe_tokens=safe, moe_aux_loss_coeff=0.0)
    for layer in model.language_model.encoder.layers:  # equal logits: the top-2 is experts 0 and 1 everywhere
        ms.ops.assign(layer.mlp.router.weight, Tensor(np.zeros(layer.mlp.router.weight.shape, np.float32)))
    tokens, labels = batch(model.config)
    loss, grads = loss_and_grads(model, tokens, labels)
    assert np.isfinite(loss)
    w1 = grads["language_model.encoder.layers.0.mlp.experts.dense_h_to_4h.weight"]
    assert np.abs(w1[:2]).sum() > 0 and np.abs(w1[2:]).sum() == 0


def test_aux_loss_is_not_in_the_logged_loss_but_in_the_gradient():
    with_aux, without = moe_model("mixtral", moe_aux_loss_coeff=0.5), moe_model("mixtral", moe_aux_loss_coeff=0.0)
    tokens, labels = batch(with_aux.config)
    l1, g1 = loss_and_grads(with_aux, tokens, labels)
    stats = get_moe_metrics_tracker().report(["load_balancing_loss"], num_layers=2, moe_layers=2, loss_scale=1.0,
                                             num_experts=4, moe_layer_indices=[0, 1])
    assert stats.losses["load_balancing_loss"] > 0
    assert stats.tokens_per_expert[0].sum() == 2 * 16 * 2  # every token routed to 2 experts, counted once
    l2, g2 = loss_and_grads(without, tokens, labels)
    assert l1 == l2
    key = "language_model.encoder.layers.0.mlp.router.weight"
    assert g1[key].shape == g2[key].shape  # rel_err is inf on a mismatch, which would pass the next line
    assert rel_err(g1[key], g2[key]) > 1e-3


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=4, moe_router_topk=5), "--moe-router-topk 5"),
    (dict(num_experts=4, moe_router_topk=1), "--moe-router-pre-softmax"),
    (dict(num_experts=4, moe_expert_capacity_factor=0.0), "--moe-expert-capacity-factor"),
    (dict(num_experts=4, moe_expert_capacity_factor=-1.0), "--moe-expert-capacity-factor"),
    (dict(num_experts=4, moe_router_enable_expert_bias=True), "sigmoid"),
    (dict(num_experts=6, moe_router_num_groups=4, moe_router_group_topk=2), "--moe-router-num-groups 4"),
    (dict(num_experts=4, moe_layer_freq=[1, 0, 1]), "--num-layers"),
    (dict(num_experts=4, moe_token_dispatcher_type="flex"), "flex"),
    (dict(num_experts=4, moe_router_load_balancing_type="quantile_balancing"), "quantile"),
    (dict(num_experts=4, moe_pad_expert_input_to_capacity=True), "--moe-expert-capacity-factor"),
    (dict(moe_ffn_hidden_size=16), "--num-experts"),
])
def test_bad_moe_configs_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        make_config("llama", moe_config=MoEConfig(**kwargs))


@pytest.mark.parametrize("sizes,message", [
    (dict(tensor_model_parallel_size=2), "--sequence-parallel"),
    (dict(tensor_model_parallel_size=1, expert_model_parallel_size=3), "--expert-model-parallel-size 3"),
    (dict(tensor_model_parallel_size=1, expert_model_parallel_size=1, expert_tensor_parallel_size=5),
     "--expert-tensor-parallel-size"),
])
def test_moe_parallel_sizes_are_checked_before_any_group(sizes, message):
    cfg = make_config("llama", moe_config=MoEConfig(num_experts=4, moe_ffn_hidden_size=24))
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        cfg.validate_parallel(**sizes)


def test_capacity_large_enough_to_drop_nothing_equals_dropless():
    dropless = moe_model("mixtral")
    roomy = moe_model("mixtral", moe_expert_capacity_factor=2.0)  # capacity = T x k / E x 2 = every token
    tokens, labels = batch(dropless.config)
    l1, g1 = loss_and_grads(dropless, tokens, labels)
    l2, g2 = loss_and_grads(roomy, tokens, labels)
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("options", [dict(jit_layers=True), dict(recompute_granularity="full", recompute_method="uniform"),
                                     dict(moe_layer_recompute=True)], ids=["jit_layers", "full_recompute", "moe_recompute"])
def test_compiled_and_recomputed_moe_layers_give_the_same_loss_and_gradients(options):
    """jit_layers compiles the attention half of an MoE layer (routing stays eager); recomputing whole layers or
    only the MoE layers (--moe-layer-recompute) re-runs their forward in the backward; all give the eager run's
    loss and gradients, and the router statistics are counted once."""
    moe_options = {"moe_layer_recompute": True} if options.get("moe_layer_recompute") else {}
    model_options = {k: v for k, v in options.items() if k != "moe_layer_recompute"}
    base, moe = MODELS["mixtral"]
    eager = GPTModel(make_config(base, moe_config=MoEConfig(**moe, moe_input_jitter_eps=0.01)))
    other = GPTModel(make_config(base, moe_config=MoEConfig(**moe, moe_input_jitter_eps=0.01, **moe_options),
                                 **model_options))
    tokens, labels = batch(eager.config)
    tp.model_parallel_seed(99)
    l1, g1 = loss_and_grads(eager, tokens, labels)
    get_moe_metrics_tracker().clear()
    tp.model_parallel_seed(99)  # the same jitter draws
    l2, g2 = loss_and_grads(other, tokens, labels)
    stats = get_moe_metrics_tracker().report(["load_balancing_loss"], num_layers=2, moe_layers=2, loss_scale=1.0,
                                             num_experts=4, moe_layer_indices=[0, 1])
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    for key in g1:
        assert rel_err(g2[key], g1[key]) < 1e-5, key
    assert stats.tokens_per_expert[0].sum() == 2 * 16 * 2  # counted in the forward only, not on the recompute
