"""Optimizer, scheduler, clipping and loss scaling: Megatron's param groups, AdamW / SGD steps against numpy,
exact state save/load, every lr / wd schedule against its closed form, the scheduler's checkpoint rules, the
global grad norm's counting rules, dynamic and adaptive loss-scale sequences; and on 2 ranks (one msrun)
TP=2 clipping against the single-process clipping, PP=2 shared-embedding counting and inf/nan agreement."""
import json
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor
from safetensors.numpy import load_file, save_file

from multiproc import run_on_ranks
from numerics import rel_err
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core.comm import ProcessGroup
from mindtron.parallel_core.optimizer import (
    AdaptiveLossScaler, AdaptiveLossScaleUpdateCell, ConstantLossScaler, DynamicLossScaler,
    OptimizerParamScheduler, adaptive_scale_windows, clip_grad_by_total_norm, clip_grads, found_inf_in_grads,
    get_grad_norm, get_megatron_optimizer, grads_for_norm, load_optimizer_state_dict, optimizer_state_dict,
    unscale_grads)
from mindtron.parallel_core.runtime import init_runtime
from mindtron.training.config import OptimizerConfig


@pytest.fixture(autouse=True)
def world_of_one():
    init_runtime("CPU")
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()


def make_params(seed=0):
    """A decayed weight, a bias, a norm weight, a second decayed weight: decay and no-decay interleaved."""
    rng = np.random.default_rng(seed)
    spec = [("layer.weight", (4, 3)), ("layer.bias", (4,)), ("norm.weight", (3,)), ("proj.weight", (2, 4))]
    return [Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=name) for name, shape in spec]


def make_grads(params, seed):
    rng = np.random.default_rng(1000 + seed)
    return tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in params)


def values(params):
    return [p.asnumpy().copy() for p in params]


# ------------------------------------------------------------------------------------------------------
# Building the optimizer
# ------------------------------------------------------------------------------------------------------
def test_param_groups_follow_megatrons_decay_rule():
    params = make_params()
    params.append(Parameter(Tensor(np.zeros((2, 2), np.float32)), name="odd.bias"))  # 2-D but a bias
    opt = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.05), params)
    decay, no_decay = opt.param_groups
    assert [p.name for p in decay["params"]] == ["layer.weight", "proj.weight"]
    assert [p.name for p in no_decay["params"]] == ["layer.bias", "norm.weight", "odd.bias"]
    assert (decay["wd_mult"], decay["weight_decay"]) == (1.0, 0.05)
    assert (no_decay["wd_mult"], no_decay["weight_decay"]) == (0.0, 0.0)
    assert decay["lr_mult"] == no_decay["lr_mult"] == 1.0 and decay["lr"] == no_decay["lr"] == 0.1
    only_weights = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1), [make_params()[0]])
    assert len(only_weights.param_groups) == 1


def test_decoupled_lr_groups_and_schedule():
    """--decoupled-lr: the embedding / output-layer weights get their own groups (after the default ones),
    whose schedule peaks at decoupled_lr and ends at decoupled_min_lr (or --min-lr)."""
    params = make_params()
    embedding = Parameter(Tensor(np.ones((5, 3), np.float32)), name="language_model.embedding.word_embeddings.weight")
    embedding.is_embedding_or_output_parameter = True
    params.append(embedding)
    cfg = OptimizerConfig(optimizer_type="sgd", learning_rate=1.0, weight_decay=0.1, sgd_momentum=0.0,
                          decoupled_lr=0.2, decoupled_min_lr=0.02)
    opt = get_megatron_optimizer(cfg, params)
    assert [[p.name for p in g["params"]] for g in opt.param_groups] == [
        ["layer.weight", "proj.weight"], ["layer.bias", "norm.weight"],
        ["language_model.embedding.word_embeddings.weight"]]
    assert [g["is_decoupled_lr"] for g in opt.param_groups] == [False, False, True]
    sched = OptimizerParamScheduler(opt, 0.0, 1.0, 0.1, 2, 12, "linear", 0.1, 0.1, 12, "constant",
                                    use_checkpoint_opt_param_scheduler=False)
    sched.step(1)  # warmup half-way: 0.5 and 0.1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5, 0.1])
    sched.step(6)  # 7 of 12, decay 5/10 done: 0.1 + 0.5 * 0.9 = 0.55; 0.02 + 0.5 * 0.18 = 0.11
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.55, 0.55, 0.11])
    before = embedding.asnumpy().astype(np.float64)
    grads = make_grads(params, 2)
    opt(grads)
    want = before - 0.11 * (grads[-1].asnumpy() + 0.1 * before)  # decayed: a 2-D weight
    assert rel_err(embedding.asnumpy(), want) < 1e-6
    sched.step(100)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1, 0.02])
    # without decoupled_min_lr the decoupled groups end at --min-lr; without decoupled_lr nothing changes
    plain = get_megatron_optimizer(OptimizerConfig(learning_rate=1.0, decoupled_lr=0.2), params)
    assert "min_lr" not in plain.param_groups[-1] and plain.param_groups[-1]["max_lr"] == 0.2
    assert len(get_megatron_optimizer(OptimizerConfig(learning_rate=1.0), params).param_groups) == 2


def test_weight_decay_on_qk_layernorm():
    """--apply-wd-to-qk-layernorm decays the query/key norm weights and biases; other 1-D parameters stay
    exempt."""
    params = make_params()
    for name in ("attn.q_layernorm.weight", "attn.k_layernorm.bias"):
        params.append(Parameter(Tensor(np.ones(3, np.float32)), name=name))
    default = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1), params)
    assert [p.name for p in default.param_groups[1]["params"]] == [
        "layer.bias", "norm.weight", "attn.q_layernorm.weight", "attn.k_layernorm.bias"]
    qk = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1, apply_wd_to_qk_layernorm=True), params)
    assert [p.name for p in qk.param_groups[0]["params"]] == [
        "layer.weight", "proj.weight", "attn.q_layernorm.weight", "attn.k_layernorm.bias"]


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match="--optimizer"):
        get_megatron_optimizer(OptimizerConfig(optimizer_type="lamb", learning_rate=0.1), make_params())
    with pytest.raises(ValueError, match="--lr"):
        get_megatron_optimizer(OptimizerConfig(), make_params())
    with pytest.raises(ValueError, match="no parameters"):
        get_megatron_optimizer(OptimizerConfig(learning_rate=0.1), [])
    opt = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1), make_params())
    with pytest.raises(ValueError, match="gradients"):
        opt(make_grads(make_params(), 0)[:2])


def numpy_adamw(p, g, m, v, t, lr, wd, b1, b2, eps):
    """torch.optim.AdamW's update in float64."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
    return p - lr / (1 - b1 ** t) * m / denom, m, v


def test_adamw_two_steps_match_numpy():
    cfg = OptimizerConfig(learning_rate=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    params = make_params()
    ref = [v.astype(np.float64) for v in values(params)]
    opt = get_megatron_optimizer(cfg, params)
    m = [np.zeros_like(r) for r in ref]
    s = [np.zeros_like(r) for r in ref]
    for t in (1, 2):
        grads = make_grads(params, t)
        opt(grads)  # gradients in the order of `params`, although the groups reorder them
        for i, p in enumerate(params):
            wd = 0.0 if p.name.endswith(".bias") or len(p.shape) == 1 else 0.1
            ref[i], m[i], s[i] = numpy_adamw(ref[i], grads[i].asnumpy().astype(np.float64), m[i], s[i], t,
                                             0.01, wd, 0.9, 0.95, 1e-8)
    for p, r in zip(params, ref):
        assert rel_err(p.asnumpy(), r) < 1e-6, p.name


def test_fused_adamw_kernel_follows_megatrons_adamw_over_many_steps():
    """The fused paths against numpy's bias-corrected AdamW and against MindSpore's composite AdamW (fused=False)
    over 30 steps with lr and weight decay changing every step (as a scheduler does): mindtron's in-place CPU
    kernel (the default on CPU) and MindSpore's AdamWeightDecay with rescaled hyper-parameters (the fused path
    elsewhere). Equal to fp32 rounding; at step 1 the bias correction is largest (1 - 0.95 = 0.05)."""
    from mindtron.parallel_core import cpu_kernels
    from mindtron.parallel_core.optimizer.optimizer import MegatronAdamW, fused_adamw_hyperparameters

    cfg = OptimizerConfig(learning_rate=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    fused_params, ms_kernel_params, plain_params = make_params(), make_params(), make_params()
    fused = get_megatron_optimizer(cfg, fused_params)
    ms_kernel = get_megatron_optimizer(cfg, ms_kernel_params)
    plain = get_megatron_optimizer(cfg, plain_params)
    assert isinstance(fused, MegatronAdamW) and fused.fused
    assert (fused._cpu_step is not None) == cpu_kernels.enabled()
    ms_kernel._cpu_step = None
    plain.fused = False
    ref = [v.astype(np.float64) for v in values(fused_params)]
    m = [np.zeros_like(r) for r in ref]
    s = [np.zeros_like(r) for r in ref]
    for t in range(1, 31):
        lr, wd = 0.01 * (1 + 0.1 * math.sin(t)), 0.1 * t / 30
        for opt in (fused, ms_kernel, plain):
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = lr, wd * group["wd_mult"]
        grads = make_grads(fused_params, t)
        for opt in (fused, ms_kernel, plain):
            opt(grads)
        for i, p in enumerate(fused_params):
            decay = 0.0 if p.name.endswith(".bias") or len(p.shape) == 1 else wd
            ref[i], m[i], s[i] = numpy_adamw(ref[i], grads[i].asnumpy().astype(np.float64), m[i], s[i], t,
                                             lr, decay, 0.9, 0.95, 1e-8)
    for p, k, q, r in zip(fused_params, ms_kernel_params, plain_params, ref):
        for got in (p, k):
            assert rel_err(got.asnumpy(), r) < 1e-6, p.name
            assert rel_err(got.asnumpy(), q.asnumpy()) < 1e-6, p.name
    # the rescaled hyper-parameters reproduce the bias-corrected update exactly in float64
    lr_k, eps_k, wd_k = fused_adamw_hyperparameters(0.01, 0.1, 0.9, 0.95, 1e-8, 3)
    p0, g_m, g_v = 1.5, 0.2, 0.03
    want = p0 * (1 - 0.01 * 0.1) - 0.01 / (1 - 0.9 ** 3) * g_m / (math.sqrt(g_v) / math.sqrt(1 - 0.95 ** 3) + 1e-8)
    assert p0 - lr_k * (g_m / (math.sqrt(g_v) + eps_k) + wd_k * p0) == pytest.approx(want, rel=1e-14)


def test_sgd_momentum_two_steps_match_numpy():
    cfg = OptimizerConfig(optimizer_type="sgd", learning_rate=0.1, weight_decay=0.2, sgd_momentum=0.9)
    params = make_params()
    ref = [v.astype(np.float64) for v in values(params)]
    buf = [None] * len(params)
    opt = get_megatron_optimizer(cfg, params)
    for t in (1, 2):
        grads = make_grads(params, t)
        opt(grads)
        for i, p in enumerate(params):
            wd = 0.0 if len(p.shape) == 1 else 0.2
            g = grads[i].asnumpy().astype(np.float64) + wd * ref[i]  # torch SGD: L2 decay into the gradient
            buf[i] = g if buf[i] is None else 0.9 * buf[i] + g
            ref[i] = ref[i] - 0.1 * buf[i]
    for p, r in zip(params, ref):
        assert rel_err(p.asnumpy(), r) < 1e-6, p.name


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_save_load_continues_bit_identically(kind, tmp_path):
    cfg = OptimizerConfig(optimizer_type=kind, learning_rate=0.05, weight_decay=0.1)

    def build(start):
        params = [Parameter(Tensor(v), name=p.name) for v, p in zip(start, make_params())]
        opt = get_megatron_optimizer(cfg, params)
        sched = OptimizerParamScheduler(opt, 0.0, 0.05, 0.005, 2, 8, "cosine", 0.05, 0.15, 8, "linear",
                                        use_checkpoint_opt_param_scheduler=False)
        return params, opt, sched

    def run(params, opt, sched, steps):
        for t in steps:
            opt(make_grads(params, t))
            sched.step(1)

    initial = values(make_params())
    params, opt, sched = build(initial)
    run(params, opt, sched, range(6))
    uninterrupted = values(params)

    params, opt, sched = build(initial)
    run(params, opt, sched, range(3))
    save_file(optimizer_state_dict(opt), str(tmp_path / "optimizer.safetensors"))
    sched_state = json.loads(json.dumps(sched.state_dict()))
    weights = values(params)

    params, opt, sched = build(weights)
    load_optimizer_state_dict(opt, load_file(str(tmp_path / "optimizer.safetensors")))
    sched.load_state_dict(sched_state)
    run(params, opt, sched, range(3, 6))
    for got, want in zip(values(params), uninterrupted):
        np.testing.assert_array_equal(got, want)


def test_state_dict_contents_and_load_errors():
    params = make_params()
    opt = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1), params)
    opt(make_grads(params, 0))
    state = optimizer_state_dict(opt)
    assert set(state) == ({f"{slot}.{p.name}" for slot in ("exp_avg", "exp_avg_sq") for p in params}
                          | {"step"} | {f"param_groups.{i}.{f}" for i in (0, 1) for f in ("lr", "weight_decay")})
    assert int(state["step"]) == 1 and state["exp_avg.layer.weight"].shape == (4, 3)
    fresh = get_megatron_optimizer(OptimizerConfig(learning_rate=0.1), make_params())
    with pytest.raises(ValueError, match="exp_avg.layer.bias"):
        load_optimizer_state_dict(fresh, {k: v for k, v in state.items() if k != "exp_avg.layer.bias"})
    with pytest.raises(ValueError, match="shape"):
        load_optimizer_state_dict(fresh, {**state, "exp_avg.layer.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="does not hold"):
        load_optimizer_state_dict(fresh, {**state, "exp_avg.extra.weight": np.zeros((1,), np.float32)})
    sgd = get_megatron_optimizer(OptimizerConfig(optimizer_type="sgd", learning_rate=0.1), make_params())
    with pytest.raises(ValueError, match="momentum_buffer"):
        load_optimizer_state_dict(sgd, state)


# ------------------------------------------------------------------------------------------------------
# Scheduler
# ------------------------------------------------------------------------------------------------------
class FakeOptimizer:
    """Just param groups, as the scheduler sees an optimizer."""

    def __init__(self):
        self.param_groups = [{"wd_mult": 1.0, "lr_mult": 1.0}, {"wd_mult": 0.0, "lr_mult": 1.0}]


def scheduler(style="linear", wd_style="constant", start_wd=0.1, end_wd=0.1, **kw):
    args = dict(init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110,
                lr_decay_style=style, start_wd=start_wd, end_wd=end_wd, wd_incr_steps=100, wd_incr_style=wd_style)
    args.update(kw)
    return OptimizerParamScheduler(FakeOptimizer(), **args)


def lr_at(sched, n):
    sched.step(n - sched.num_steps)
    lrs = [g["lr"] for g in sched.optimizer.param_groups]
    assert lrs[0] == lrs[1] == sched.get_lr({})
    return lrs[0]


def wd_at(sched, n):
    sched.step(n - sched.num_steps)
    decay, no_decay = sched.optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0
    return decay["weight_decay"]


COS = lambda r: 0.5 * (1 + math.cos(math.pi * r))  # noqa: E731
LR_CASES = {
    # style: [(step, expected lr)] with warmup 10, decay 110, max 1.0, min 0.1, init 0.0
    "constant": [(0, 0.0), (5, 0.5), (10, 1.0), (60, 1.0), (500, 1.0)],
    "linear": [(0, 0.0), (5, 0.5), (10, 1.0), (35, 0.1 + 0.9 * 0.75), (60, 0.55), (110, 0.1), (111, 0.1)],
    "cosine": [(3, 0.3), (10, 1.0), (35, 0.1 + 0.9 * COS(0.25)), (60, 0.55), (85, 0.1 + 0.9 * COS(0.75)),
               (110, 0.1), (200, 0.1)],
    "inverse-square-root": [(7, 0.7), (10, 1.0), (40, 0.5), (100, math.sqrt(0.1)), (110, math.sqrt(10 / 110)),
                            (111, 0.1)],
}


@pytest.mark.parametrize("style", sorted(LR_CASES))
def test_lr_decay_styles_follow_closed_forms(style):
    sched = scheduler(style)
    for n, want in LR_CASES[style]:
        assert lr_at(sched, n) == pytest.approx(want, rel=1e-12, abs=1e-15), (style, n)


def test_inverse_square_root_is_floored_at_min_lr():
    sched = scheduler("inverse-square-root", min_lr=0.4, lr_decay_steps=1000)
    assert lr_at(sched, 50) == pytest.approx(math.sqrt(0.2))
    assert lr_at(sched, 100) == pytest.approx(0.4)  # sqrt(10/100) = 0.316 < min_lr


@pytest.mark.parametrize("wsd_style,final", [
    ("linear", lambda q: 1 - q), ("cosine", COS), ("exponential", lambda q: 2 * 0.5 ** q - 1),
    ("minus_sqrt", lambda q: 1 - math.sqrt(q))])
def test_wsd_warmup_stable_decay(wsd_style, final):
    sched = scheduler("WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
    assert lr_at(sched, 5) == pytest.approx(0.5)  # warmup
    for n in (10, 50, 90):  # stable until decay_steps - wsd_decay_steps = 90
        assert lr_at(sched, n) == 1.0
    for n in (95, 100, 105, 110):
        assert lr_at(sched, n) == pytest.approx(0.1 + 0.9 * final((n - 90) / 20), rel=1e-12), (wsd_style, n)
    assert lr_at(sched, 110) == pytest.approx(0.1, abs=1e-12) and lr_at(sched, 111) == 0.1


def test_wsd_defaults_to_exponential_and_needs_its_length():
    sched = scheduler("WSD", wsd_decay_steps=20)
    assert lr_at(sched, 100) == pytest.approx(0.1 + 0.9 * (2 * 0.5 ** 0.5 - 1))
    with pytest.raises(ValueError, match="--lr-wsd-decay-iters"):
        scheduler("WSD")
    with pytest.raises(ValueError, match="--lr-wsd-decay-style"):
        scheduler("WSD", wsd_decay_steps=20, lr_wsd_decay_style="square")


@pytest.mark.parametrize("wd_style,coeff", [("linear", lambda t: t),
                                            ("cosine", lambda t: 0.5 * (1 - math.cos(math.pi * t)))])
def test_weight_decay_increment_styles(wd_style, coeff):
    sched = scheduler(wd_style=wd_style, start_wd=0.02, end_wd=0.1)
    for n in (0, 25, 50, 75, 100):
        assert wd_at(sched, n) == pytest.approx(0.02 + 0.08 * coeff(n / 100), rel=1e-12), (wd_style, n)
    assert wd_at(sched, 150) == 0.1


def test_constant_weight_decay_and_group_overrides():
    sched = scheduler(start_wd=0.3, end_wd=0.3)
    assert wd_at(sched, 0) == 0.3 and wd_at(sched, 500) == 0.3
    sched.optimizer.param_groups[0].update(max_lr=2.0, min_lr=0.2, lr_mult=0.5)
    sched.step(50 - sched.num_steps)  # linear: ratio 0.4
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (0.2 + 1.8 * 0.6))
    assert sched.optimizer.param_groups[1]["lr"] == pytest.approx(0.1 + 0.9 * 0.6)


def test_scheduler_argument_errors():
    for kw, flag in [(dict(min_lr=-1.0), "--min-lr"), (dict(max_lr=0.05), "--min-lr"),
                     (dict(init_lr=2.0), "--lr-warmup-init"), (dict(lr_decay_steps=0), "decay length"),
                     (dict(lr_warmup_steps=110), "warmup"), (dict(lr_decay_style="step"), "--lr-decay-style"),
                     (dict(start_wd=0.2, end_wd=0.1, wd_style="linear"), "--end-weight-decay"),
                     (dict(start_wd=0.0, end_wd=0.1), "constant"),
                     (dict(wd_style="exp"), "--weight-decay-incr-style"),
                     (dict(use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=True),
                      "cannot both")]:
        with pytest.raises(ValueError, match=flag):
            scheduler(**kw)


def test_scheduler_sets_the_lr_the_optimizer_uses():
    cfg = OptimizerConfig(optimizer_type="sgd", learning_rate=123.0, weight_decay=0.0, sgd_momentum=0.0)
    params = make_params()
    opt = get_megatron_optimizer(cfg, params)
    sched = OptimizerParamScheduler(opt, 0.0, 1.0, 0.0, 4, 10, "linear", 0.1, 0.3, 10, "linear",
                                    use_checkpoint_opt_param_scheduler=False)
    sched.step(2)  # warmup: lr 0.5; wd 0.1 + 0.2 * 0.2 = 0.14 on the decay group only
    before = [v.astype(np.float64) for v in values(params)]
    grads = make_grads(params, 3)
    opt(grads)
    for p, b, g in zip(params, before, grads):
        wd = 0.0 if len(p.shape) == 1 else 0.14
        want = b - 0.5 * (g.asnumpy().astype(np.float64) + wd * b)
        assert rel_err(p.asnumpy(), want) < 1e-6, p.name


def test_scheduler_moves_adamw_lr_too():
    params = make_params()
    opt = get_megatron_optimizer(OptimizerConfig(learning_rate=99.0, weight_decay=0.0), params)
    sched = OptimizerParamScheduler(opt, 0.0, 0.01, 0.0, 0, 10, "constant", 0.0, 0.0, 10, "constant")
    before = values(params)
    grads = make_grads(params, 1)
    opt(grads)
    for p, b, g in zip(params, before, grads):
        want, _, _ = numpy_adamw(b.astype(np.float64), g.asnumpy().astype(np.float64), 0.0, 0.0, 1, 0.01, 0.0,
                                 0.9, 0.999, 1e-8)
        assert rel_err(p.asnumpy(), want) < 1e-6
    assert sched.get_lr(opt.param_groups[0]) == 0.01


def test_scheduler_state_dict_rules():
    base = scheduler("cosine", use_checkpoint_opt_param_scheduler=False)
    base.step(42)
    saved = json.loads(json.dumps(base.state_dict()))
    assert saved["num_steps"] == 42 and saved["max_lr"] == 1.0

    same = scheduler("cosine", use_checkpoint_opt_param_scheduler=False)
    same.load_state_dict(saved)
    assert same.num_steps == 42 and same.optimizer.param_groups[0]["lr"] == base.optimizer.param_groups[0]["lr"]

    strict = scheduler("cosine", max_lr=2.0, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="--override-opt_param-scheduler"):
        strict.load_state_dict(saved)

    override = scheduler("linear", max_lr=2.0, use_checkpoint_opt_param_scheduler=False,
                         override_opt_param_scheduler=True)
    override.load_state_dict(saved)
    assert (override.max_lr, override.lr_decay_style, override.num_steps) == (2.0, "linear", 42)
    assert override.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 + 1.9 * (1 - 32 / 100))

    from_ckpt = scheduler("linear", max_lr=2.0, start_wd=0.0, end_wd=0.5, wd_style="linear",
                          use_checkpoint_opt_param_scheduler=True)
    from_ckpt.load_state_dict(saved)
    assert (from_ckpt.max_lr, from_ckpt.lr_decay_style, from_ckpt.wd_incr_style) == (1.0, "cosine", "constant")
    assert from_ckpt.optimizer.param_groups[0]["lr"] == base.optimizer.param_groups[0]["lr"]

    legacy = {"start_lr": 1.0, "min_lr": 0.1, "warmup_iter": 10, "end_iter": 110, "decay_style": "cosine",
              "num_iters": 42}
    old = scheduler("cosine", use_checkpoint_opt_param_scheduler=False)
    old.load_state_dict(legacy)
    assert old.num_steps == 42 and old.optimizer.param_groups[0]["lr"] == base.optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------------------
# Gradient norm and clipping
# ------------------------------------------------------------------------------------------------------
def norm_params():
    split = Parameter(Tensor(np.zeros((2, 2), np.float32)), name="fc.weight")
    split.tensor_model_parallel = True
    replicated = Parameter(Tensor(np.zeros((2,), np.float32)), name="norm.weight")
    replicated.tensor_model_parallel = False
    bare = Parameter(Tensor(np.zeros((1,), np.float32)), name="extra.bias")  # no attribute: replicated
    head = Parameter(Tensor(np.zeros((2,), np.float32)), name="word_embeddings_for_head.weight")
    head.tensor_model_parallel = True
    tied = Parameter(Tensor(np.zeros((1,), np.float32)), name="embedding.word_embeddings.weight")
    tied.tensor_model_parallel, tied.shared_embedding = True, True
    grads = [Tensor(np.array([[1.0, 2.0], [2.0, 0.0]], np.float32)), Tensor(np.array([1.0, 1.0], np.float32)),
             Tensor(np.array([3.0], np.float32)), Tensor(np.array([2.0, 2.0], np.float32)),
             Tensor(np.array([-5.0], np.float32))]
    return [split, replicated, bare, head, tied], grads


def test_grad_norm_counts_each_parameter_once():
    params, grads = norm_params()
    # tp rank 0, first stage: everything (9 + 2 + 9 + 8 + 25)
    assert get_grad_norm(params, grads) == pytest.approx(math.sqrt(53))
    fake_group = ProcessGroup((0,), "")
    assert get_grad_norm(params, grads, fake_group) == pytest.approx(math.sqrt(53))
    # another tp rank: replicated parameters (with or without the attribute) are left to tp rank 0
    assert get_grad_norm(params, grads, fake_group, tp_rank=1) == pytest.approx(math.sqrt(9 + 8 + 25))
    # a later pipeline stage: the shared embedding copies are left to the first stage
    assert get_grad_norm(params, grads, fake_group, pp_rank=1) == pytest.approx(math.sqrt(9 + 2 + 9))
    assert [g.shape for g in grads_for_norm(params, grads, tp_rank=1, pp_rank=1)] == [(2, 2)]
    assert get_grad_norm(params, grads, norm_type=float("inf")) == 5.0
    assert get_grad_norm(params, grads, norm_type=math.inf, tp_rank=1, pp_rank=1) == 2.0
    with pytest.raises(ValueError, match="norm_type"):
        get_grad_norm(params, grads, norm_type=1)


def test_clip_grads_scales_by_megatrons_coefficient():
    params, grads = norm_params()
    clipped, norm = clip_grads(params, grads, max_norm=1.0)
    coeff = 1.0 / (math.sqrt(53) + 1e-6)
    assert norm == pytest.approx(math.sqrt(53))
    for c, g in zip(clipped, grads):
        np.testing.assert_allclose(c.asnumpy(), g.asnumpy() * coeff, rtol=1e-6)
    assert get_grad_norm(params, clipped) == pytest.approx(1.0, rel=1e-5)
    unclipped, norm = clip_grads(params, grads, max_norm=10.0)
    assert all(u is g for u, g in zip(unclipped, grads)) and norm == pytest.approx(math.sqrt(53))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_by_total_norm(grads, 0.0, 1.0)


def test_nonfinite_norm_is_reported_not_clipped():
    params, grads = norm_params()
    grads[0] = Tensor(np.array([[np.nan, 1.0], [0.0, 0.0]], np.float32))
    out, norm = clip_grads(params, grads, 1.0)
    assert math.isnan(norm) and all(o is g for o, g in zip(out, grads))
    with pytest.raises(ValueError, match="error_if_nonfinite"):
        clip_grads(params, grads, 1.0, error_if_nonfinite=True)


# ------------------------------------------------------------------------------------------------------
# Loss scaling
# ------------------------------------------------------------------------------------------------------
def test_constant_scaler():
    s = ConstantLossScaler(128.0)
    s.update(True)
    s.update(False)
    assert s.scale == 128.0 and s.inv_scale == 1 / 128 and s.state_dict() == {}
    with pytest.raises(ValueError, match="--loss-scale"):
        ConstantLossScaler(0.0)


def test_dynamic_scaler_hysteresis_and_growth():
    s = DynamicLossScaler(1024.0, 128.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3, hysteresis=2)
    trace = []
    for found_inf in [True, True, True, False, False, False, True, False, False, True, False, False, False,
                      True, True, True, True]:
        s.update(found_inf)
        trace.append(s.scale)
    # 1st overflow uses up the hysteresis; 2nd, 3rd back off; 3 clean steps grow and refill the hysteresis
    # (2); the next overflow is absorbed, but clean steps without growth do not refill it, so the one after
    # backs off and also resets the clean count; the floor is min_scale.
    assert trace == [1024, 512, 256, 256, 256, 512, 512, 512, 512, 256, 256, 256, 512, 512, 256, 128, 128]
    state = json.loads(json.dumps(s.state_dict()))
    t = DynamicLossScaler(1.0, 1.0, growth_interval=3, hysteresis=2)
    t.load_state_dict(state)
    assert (t.scale, t.growth_tracker, t.hysteresis_tracker) == (128.0, 0, s.hysteresis_tracker)
    for kw, flag in [(dict(min_scale=2048.0), "--min-loss-scale"), (dict(growth_interval=0), "--loss-scale-window"),
                     (dict(hysteresis=0), "--hysteresis"), (dict(growth_factor=1.0), "growth_factor"),
                     (dict(backoff_factor=1.0), "backoff_factor")]:
        with pytest.raises(ValueError, match=flag):
            DynamicLossScaler(**{"initial_scale": 1024.0, "min_scale": 1.0, **kw})


def test_adaptive_window_ladder():
    assert adaptive_scale_windows(1000, 20) == [20, 30, 40, 50, 100, 200, 500, 1000]
    assert adaptive_scale_windows(150, 20) == [20, 150]
    with pytest.raises(ValueError, match="max_scale_window"):
        adaptive_scale_windows(20, 20)
    assert AdaptiveLossScaleUpdateCell is AdaptiveLossScaler
    cell = AdaptiveLossScaleUpdateCell(1, 2, 20, 1000, 20)  # document 000's example
    assert cell.get_loss_scale() == 1.0 and cell.scale_window == 20
    assert AdaptiveLossScaler(1.0, 2.0, 77, 1000, 20).scale_window == 20  # off the ladder: min window


def clean(s, n):
    for _ in range(n):
        s.update(False)


def test_adaptive_growth_moves_the_window_up():
    s = AdaptiveLossScaler(2.0 ** 10, 2.0, 20, 1000, 20)
    clean(s, 19)
    assert s.scale == 2.0 ** 10
    clean(s, 1)  # the 20th clean step grows the scale
    assert s.scale == 2.0 ** 11 and s.growth_num == 1 and s.scale_window == 20
    clean(s, 40)  # third increase: next window
    assert s.scale == 2.0 ** 13 and s.scale_window == 30 and s.growth_num == 0
    clean(s, 29)
    assert s.scale == 2.0 ** 13
    clean(s, 1)
    assert s.scale == 2.0 ** 14
    windows = [s.scale_window]
    for _ in range(40):  # climb to the top and stay there
        clean(s, s.scale_window)
        windows.append(s.scale_window)
    assert windows[:4] == [30, 30, 40, 40] and 50 in windows and windows[-1] == 1000 and max(windows) == 1000


def test_adaptive_overflows_drop_to_window_one_unless_at_min_window():
    s = AdaptiveLossScaler(2.0 ** 10, 2.0, 100, 1000, 20)
    assert s.scale_window == 100
    s.update(True)
    s.update(True)
    assert s.scale == 2.0 ** 8 and s.down_num == 2 and s.scale_window == 100
    s.update(True)  # third overflow in a row: window 1
    assert s.scale == 2.0 ** 7 and s.scale_window == 1 and s.down_num == 0 and s.growth_num == 0
    clean(s, 2)  # window 1: every clean step grows
    assert s.scale == 2.0 ** 9 and s.scale_window == 1
    clean(s, 1)  # third increase: up to the min window
    assert s.scale == 2.0 ** 10 and s.scale_window == 20
    for _ in range(5):  # at the min window overflows only back off the scale
        s.update(True)
    assert s.scale_window == 20 and s.scale == 2.0 ** 5


def test_adaptive_increase_resets_the_overflow_count_and_scale_floor():
    s = AdaptiveLossScaler(8.0, 2.0, 30, 1000, 20)
    s.update(True)
    s.update(True)
    clean(s, 30)  # an increase in between
    assert s.down_num == 0 and s.scale == 4.0
    s.update(True)
    assert s.scale_window == 30 and s.down_num == 1
    state = json.loads(json.dumps(s.state_dict()))
    for _ in range(10):
        s.update(True)
    assert s.scale == 1.0  # never below 1
    t = AdaptiveLossScaler(1.0, 2.0, 20, 1000, 20)
    t.load_state_dict(state)
    assert (t.scale, t.scale_window, t.down_num) == (2.0, 30, 1)
    with pytest.raises(ValueError, match="max_scale_window"):
        AdaptiveLossScaler(1.0, 2.0, 20, 500, 20).load_state_dict(state)


def test_found_inf_and_unscale():
    ok = [Tensor(np.ones((2, 2), np.float32)), None, Tensor(np.array([3.0], np.float16))]
    assert found_inf_in_grads(ok) is False
    assert found_inf_in_grads(ok + [Tensor(np.array([np.inf], np.float32))]) is True
    assert found_inf_in_grads([Tensor(np.array([0.0, np.nan], np.float32))], ProcessGroup((0,), "")) is True
    out = unscale_grads(ok, 4.0)
    np.testing.assert_array_equal(out[0].asnumpy(), np.full((2, 2), 0.25, np.float32))
    assert out[1] is None and out[2].dtype == ms.float16 and float(out[2].asnumpy()[0]) == 0.75


# ------------------------------------------------------------------------------------------------------
# Two ranks (one msrun launch)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def optimizer_checks_2():
    return run_on_ranks(2, "tests/workers/optimizer_checks.py:main", timeout=600)


def test_tp2_clipping_equals_single_process(optimizer_checks_2):
    from workers.optimizer_checks import MAX_NORM, clip_case

    ref = clip_case()
    assert ref["norm"] > 10 * MAX_NORM  # the clip is active
    for rank, result in enumerate(optimizer_checks_2):
        got = result["tp2"]
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-6), rank
        for name in ref["clipped"]:
            assert rel_err(got["grads"][name], ref["grads"][name]) < 1e-6, (rank, name)
            assert rel_err(got["clipped"][name], ref["clipped"][name]) < 1e-6, (rank, name)


def test_pp2_counts_shared_embedding_once(optimizer_checks_2):
    for result in optimizer_checks_2:
        assert result["pp2"]["norm"] == pytest.approx(result["pp2"]["want"], rel=1e-6)
        assert result["pp2"]["inf_norm"] == result["pp2"]["want_inf"]


def test_found_inf_agrees_over_model_parallel_ranks(optimizer_checks_2):
    for result in optimizer_checks_2:
        assert result["found_inf"] == {"clean": False, "poisoned": True}
