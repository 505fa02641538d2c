"""The MoE tools of documents 000/001 in one process: callbacks in the training loop (hook order, what each
hook sees, state kept in checkpoints), the drop rate against a hand count, the token distribution files and
the plot tool, hot experts (the same model as without them, cold/hot capacities by hand, the monitor's
choices, checkpoint contents and an exact resume after a re-choice), Megatron's --moe-router-force-biased,
and the errors. Multi-rank checks (EP=2, EP=4) are in test_moe_parallel.py."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import load_file

import reference_moe as ref
from model_configs import loss_and_grads, make_config as model_config
from workers import moe_checks
from workers.training_checks import make_config
from mindtron.legacy_model import GPTModel
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.moe import MoEConfig, TopKRouter, get_moe_metrics_tracker
from mindtron.parallel_core.moe.hot_experts import choose_hot_experts
from mindtron.parallel_core.moe.router import expert_capacity
from mindtron.training.callbacks import (HOOKS, Callback, CallbackList, TrainState, build_callback, build_callbacks,
                                         register_callback)
from mindtron.training.hot_expert_monitor import ColdHotExpertMonitor
from mindtron.training.moe_callbacks import MoEDropRateCallback
from mindtron.training.token_distribution import hottest_experts, load_token_distribution, main as plot_main

REPO = Path(__file__).resolve().parent.parent
ALLTOALL = {"moe_token_dispatcher_type": "alltoall"}
# hot experts with drops: cold experts get half the capacity, the monitor re-chooses every 2 iterations
HOT_DROPS = {**ALLTOALL, "enable_cold_hot_expert": True, "hot_expert_num": 1, "hot_expert_update_step": 2,
             "moe_expert_capacity_factor": 1.0, "cold_token_percent": 0.5}


@pytest.fixture()
def world_of_one():
    ps.initialize_model_parallel()
    tp.model_parallel_seed(1234)
    get_moe_metrics_tracker().clear()
    yield
    ps.destroy_model_parallel()


class Recorder(Callback):
    """Records every hook with the state it saw; keeps a counter across a resume."""

    def __init__(self):
        self.calls, self.steps, self.loaded = [], 0, None

    def _record(self, hook, state):
        self.calls.append((hook, state.iteration, state.result is not None,
                           state.checkpoint_dir and os.path.isdir(state.checkpoint_dir)))

    def on_train_begin(self, state):
        self._record("on_train_begin", state)

    def on_train_step_begin(self, state):
        self._record("on_train_step_begin", state)

    def on_train_step_end(self, state):
        self._record("on_train_step_end", state)
        self.steps += 1
        assert sorted(state.result.moe.tokens_per_expert) == [0, 1] and state.trainer.history[-1] is state.result

    def on_save_checkpoint_begin(self, state):
        self._record("on_save_checkpoint_begin", state)

    def on_save_checkpoint_end(self, state):
        self._record("on_save_checkpoint_end", state)

    def on_train_end(self, state):
        self._record("on_train_end", state)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.loaded = state


# --------------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------------
def test_hooks_run_in_order_see_the_step_and_keep_their_state_across_a_resume(tmp_path):
    first, second = Recorder(), Recorder()
    moe_checks.run(moe=ALLTOALL, steps=3, output_dir=str(tmp_path), save_interval=1, exit_interval=2,
                   callbacks=[first])
    def saved(i):
        return ("on_save_checkpoint_begin", i, False, False), ("on_save_checkpoint_end", i, False, True)

    assert first.calls == [("on_train_begin", 0, False, None),
                           ("on_train_step_begin", 0, False, None), ("on_train_step_end", 1, True, None), *saved(1),
                           ("on_train_step_begin", 1, False, None), ("on_train_step_end", 2, True, None), *saved(2),
                           ("on_train_end", 2, False, None)]
    meta = json.loads((tmp_path / "iter_0000002" / "mp_rank_00" / "meta.json").read_text())
    assert meta["callbacks"] == {"Recorder": {"steps": 2}}
    moe_checks.run(moe=ALLTOALL, steps=3, load_checkpoint=str(tmp_path), callbacks=[second])
    assert second.loaded == {"steps": 2}
    assert [c[:2] for c in second.calls] == [("on_train_begin", 2), ("on_train_step_begin", 2),
                                             ("on_train_step_end", 3), ("on_train_end", 3)]


def test_callbacks_from_the_configuration_and_their_errors():
    @register_callback("TestOnlyCallback")
    class Counting(Callback):
        def __init__(self, every: int = 1):
            self.every = every

    config = make_config(steps=1, callbacks=[{"type": "TestOnlyCallback", "every": 3},
                                             {"type": "mindtron.training.moe_callbacks.MoEDropRateCallback"}])
    built = build_callbacks(config, callbacks=[Recorder()])
    assert [type(c).__name__ for c in built] == ["Counting", "MoEDropRateCallback", "Recorder"]
    assert built.callbacks[0].every == 3
    with pytest.raises(ValueError, match="did you mean MoEDropRateCallback"):
        build_callback({"type": "MoEDropRateCallbak"})
    with pytest.raises(ValueError, match="MoEDropRateCallback: .*unexpected keyword argument 'expert_number'"):
        build_callback({"type": "MoEDropRateCallback", "expert_number": 8})
    with pytest.raises(ValueError, match="needs a 'type'"):
        build_callback({"expert_num": 8})
    with pytest.raises(ValueError, match="cannot import"):
        build_callback({"type": "no_such_package.Callback"})
    with pytest.raises(ValueError, match="not a callback"):
        CallbackList([object()])
    assert HOOKS[0] == "on_train_begin" and HOOKS[-1] == "on_train_end"


# --------------------------------------------------------------------------------------------------------
# Drop rate and hot/cold capacities by hand
# --------------------------------------------------------------------------------------------------------
def routed_by_hand(moe: MoEConfig, capacity_scale=None, seed=3):
    """A router with capacity on 24 tokens: its statistics and the hand count (numpy routing of the same
    logits; kept = the top `capacity` weights of each expert)."""
    cfg = model_config("llama", hidden_size=8, num_attention_heads=2, num_query_groups=1, add_bias_linear=False,
                       moe_config=moe)
    router = TopKRouter(cfg, cfg.moe_config, layer_number=1)
    router.capacity_scale = capacity_scale
    rng = np.random.default_rng(seed)
    ms.ops.assign(router.weight, Tensor(rng.normal(0, 0.5, router.weight.shape).astype(np.float32)))
    x = rng.normal(size=(12, 2, 8)).astype(np.float32)
    get_moe_metrics_tracker().clear()
    router.set_train(True)
    with tp.forward_pass():
        router(Tensor(x))
    stats = get_moe_metrics_tracker().report([], num_layers=1, moe_layers=1, loss_scale=1.0,
                                             num_experts=moe.num_experts, moe_layer_indices=[0])
    logits = x.reshape(-1, 8).astype(np.float64) @ router.weight.asnumpy().T.astype(np.float64)
    uncapped = MoEConfig(**{**moe.__dict__, "moe_expert_capacity_factor": None})
    probs, routed, _ = ref.route(uncapped, logits)
    T, E, k = logits.shape[0], moe.num_experts, moe.moe_router_topk
    scale = np.ones(E) if capacity_scale is None else capacity_scale
    kept = np.zeros_like(routed)
    for e in range(E):
        capacity = math.ceil(T * k / E * moe.moe_expert_capacity_factor * scale[e])  # by hand, Megatron's formula
        best = np.argsort(-probs[:, e], kind="stable")[:capacity]
        kept[best, e] = routed[best, e]
    return stats, routed, kept


def test_drop_rate_equals_a_hand_count(world_of_one):
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.75)
    stats, routed, kept = routed_by_hand(moe)
    assert stats.tokens_per_expert[0].tolist() == routed.sum(0).tolist()
    assert stats.kept_tokens_per_expert[0].tolist() == kept.sum(0).tolist()
    config = make_config(steps=1, log_interval=1, model_options=moe_checks.moe_options(
        1, num_experts=4, moe_expert_capacity_factor=0.75))
    lines = []
    callback = MoEDropRateCallback(expert_num=4, capacity_factor=0.75, num_layers=1, mtp_depth=0)
    state = TrainState(None, config, 0, 0, log=lines.append)
    callback.on_train_begin(state)
    state.iteration, state.result = 1, type("Result", (), {"moe": stats})()
    callback.on_train_step_end(state)
    by_hand = (routed.sum() - kept.sum()) / routed.sum()
    assert 0.1 < by_hand < 0.5 and callback.last == {1: pytest.approx(by_hand, abs=1e-12)}
    assert lines == [f" MoE drop rate (iteration 1, capacity factor 0.75): layer 1: {by_hand:.4f} |"]
    for bad, message in ((dict(expert_num=8), "expert_num 8 but the model has --num-experts 4"),
                         (dict(capacity_factor=1.5), "capacity_factor 1.5 but the run's --moe-expert-capacity"),
                         (dict(num_layers=3), "num_layers 3 but the model has --num-layers 1")):
        with pytest.raises(ValueError, match=message):
            MoEDropRateCallback(**bad).on_train_begin(state)
    with pytest.raises(ValueError, match="mtp_depth"):
        MoEDropRateCallback(mtp_depth=-1)


def test_cold_experts_get_the_scaled_capacity_and_hot_ones_the_full_factor(world_of_one):
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=1.0, **ALLTOALL,
                    enable_cold_hot_expert=True, hot_expert_num=1, cold_token_percent=0.5)
    scale = np.array([0.5, 1.0, 0.5, 0.5])  # expert 1 hot
    stats, routed, kept = routed_by_hand(moe, scale)
    assert stats.kept_tokens_per_expert[0].tolist() == kept.sum(0).tolist()
    capacities = [expert_capacity(24, 4, 2, 1.0 * f) for f in scale]
    assert capacities == [6, 12, 6, 6]
    assert stats.kept_tokens_per_expert[0].tolist() == np.minimum(routed.sum(0), capacities).tolist()


# --------------------------------------------------------------------------------------------------------
# Token distribution, log lines and the plot tool, from one training run
# --------------------------------------------------------------------------------------------------------
def test_token_distribution_files_log_lines_and_pictures(tmp_path, capsys):
    out = tmp_path / "token_distribution"
    result = moe_checks.run(moe={**ALLTOALL, "moe_expert_capacity_factor": 0.75, "save_token_distribution": True,
                                 "callback_moe_droprate": True},
                            callbacks=[{"type": "MoEDropRateCallback", "mtp_depth": 1}], log_interval=2,
                            token_distribution_dir=str(out), log_token_distribution=True)
    printed = capsys.readouterr().out
    data = load_token_distribution(str(out))
    assert sorted(data) == [0, 1]
    for layer in (0, 1):
        steps, counts = data[layer]
        assert steps.tolist() == [1, 2, 3]
        assert counts[:, 0].tolist() == [t[layer] for t in result["tokens"]]
        assert counts[:, 1].tolist() == [k[layer] for k in result["kept"]]
        assert (counts[:, 0].sum(1) == 8 * 16 * 2).all()  # global batch 8 x seq 16, top-2
    # iterations 1-2 in the log lines (log interval 2): drop rate and load over the mean, per layer
    routed = {layer: sum(np.asarray(t[layer]) for t in result["tokens"][:2]) for layer in (0, 1)}
    kept = {layer: sum(np.asarray(k[layer]) for k in result["kept"][:2]) for layer in (0, 1)}
    rates = " | ".join(f"layer {l + 1}: {1 - kept[l].sum() / routed[l].sum():.4f}" for l in (0, 1))
    assert f" MoE drop rate (iterations 1-2, capacity factor 0.75): {rates} |" in printed
    loads = " | ".join(f"layer {l + 1}: max {routed[l].max() / routed[l].mean():.2f} "
                       f"min {routed[l].min() / routed[l].mean():.2f}" for l in (0, 1))
    assert f" MoE expert load over the mean (iterations 1-2): {loads} |" in printed
    assert "mtp_depth 1: mindtron models have no multi-token-prediction layers" in printed
    assert printed.count(" MoE drop rate") == 1  # the flag adds no second callback next to the listed one

    pictures = plot_main(["--num-layers", "3", "--hot-expert-num", "2", "--npy-files-load-path", str(out),
                          "--save-path-prefix", str(tmp_path / "plots") + "/", "--steps", "1,3"])
    printed = capsys.readouterr().out
    assert [Path(p).name for p in pictures] == ["layer-0_token_distribution.png", "layer-1_token_distribution.png"]
    for picture in pictures:
        assert Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(picture).stat().st_size > 10_000
    hot = [hottest_experts(data[layer][1], 2) for layer in (0, 1)]
    assert "layer-2: no files" in printed and f"hot_expert_index: {hot}" in printed


def test_plot_tool_reads_mindformers_vectors_and_names_what_is_wrong(tmp_path, monkeypatch):
    np.save(tmp_path / "layer-0_1.npy", np.array([5, 1, 0, 2]))  # MindFormers' export: routed pairs only
    np.save(tmp_path / "layer-0_2.npy", np.array([4, 2, 1, 1]))
    steps, counts = load_token_distribution(str(tmp_path))[0]
    assert steps.tolist() == [1, 2] and counts[:, 1].tolist() == counts[:, 0].tolist()
    assert hottest_experts(counts, 2) == [0, 1] and choose_hot_experts([3, 5, 5, 1], 2) == [1, 2]
    base = ["--num-layers", "1", "--npy-files-load-path", str(tmp_path), "--save-path-prefix", str(tmp_path) + "/"]
    with pytest.raises(ValueError, match=r"--steps \[7\]: no saved iteration"):
        plot_main(base + ["--steps", "7"])
    with pytest.raises(FileNotFoundError, match="--npy-files-load-path"):
        plot_main(["--num-layers", "1", "--npy-files-load-path", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no layer-<L>_<iteration>.npy files"):
        plot_main(["--num_layers", "1", "--npy_files_load_path", str(empty)])  # MindFormers' spellings
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[plot\]"'):
        plot_main(base)


def test_the_tool_script_runs_as_documented(tmp_path):
    """tools/moe_token_distribution.py is the thin command-line wrapper of token_distribution.main."""
    spec = importlib.util.spec_from_file_location("moe_token_distribution", REPO / "tools" / "moe_token_distribution.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is plot_main


# --------------------------------------------------------------------------------------------------------
# Hot experts
# --------------------------------------------------------------------------------------------------------
def moe_gpt(**moe):
    settings = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.01, **ALLTOALL)
    return GPTModel(model_config("llama", moe_config=MoEConfig(**{**settings, **moe})))


@pytest.mark.parametrize("grouped", [False, True])
def test_hot_experts_compute_the_same_model(world_of_one, grouped):
    """cold_token_percent 1 and no dropping: hot experts change where pairs are computed, not the maths."""
    base, hot = moe_gpt(moe_grouped_gemm=grouped), moe_gpt(moe_grouped_gemm=grouped, enable_cold_hot_expert=True,
                                                         hot_expert_num=2)
    for layer in hot.language_model.encoder.layers:
        layer.mlp.set_hot_experts([3, 1])
        assert layer.mlp.hot_experts.hot.tolist() == [1, 3]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base.config.vocab_size, (2, base.config.seq_length))
    l1, g1 = loss_and_grads(base, tokens, np.roll(tokens, -1, 1))
    l2, g2 = loss_and_grads(hot, tokens, np.roll(tokens, -1, 1))
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    for name, grad in g1.items():
        np.testing.assert_allclose(g2[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="need 2 distinct experts between 0 and 3"):
        hot.language_model.encoder.layers[0].mlp.set_hot_experts([1, 1])


def test_monitor_rechooses_hot_experts_checkpoints_them_and_resumes_exactly(tmp_path):
    """The monitor makes the most loaded expert of the last 2 iterations hot at iteration 2, the cold experts
    then keep half the capacity; a run stopped at 1 keeps the counts of iteration 1 in its checkpoint (with
    the owners' current experts) and resumes to the uninterrupted run's losses and choices."""
    full = moe_checks.run(moe=HOT_DROPS)
    expected = [(2, layer + 1, [0], choose_hot_experts(np.add(*[t[layer] for t in full["tokens"][:2]]), 1))
                for layer in (0, 1)]
    assert full["choices"] == [c for c in expected if c[2] != c[3]] and full["choices"]
    for step, kept in enumerate(full["kept"]):
        for layer in (0, 1):  # iterations 1-2 with expert 0 hot, iteration 3 with the chosen one
            hot = 0 if step < 2 else expected[layer][3][0]
            # 4 micro-batches of 32 tokens: at most 4 x 16 pairs for the hot expert, 4 x 8 for the cold ones
            bound = [4 * expert_capacity(32, 4, 2, 1.0 if e == hot else 0.5) for e in range(4)]
            assert all(k <= b for k, b in zip(kept[layer], bound)), (step, layer, kept[layer], bound)

    head = moe_checks.run(moe=HOT_DROPS, output_dir=str(tmp_path), exit_interval=1)
    saved = tmp_path / "iter_0000001" / "mp_rank_00"
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["callbacks"]["ColdHotExpertMonitor"] == {
        "hot": {"0": [0], "1": [0]}, "window": {str(l): full["tokens"][0][l] for l in (0, 1)}}
    tail = moe_checks.run(moe=HOT_DROPS, load_checkpoint=str(tmp_path))
    assert head["loss"] + tail["loss"] == full["loss"] and tail["choices"] == full["choices"]


def test_checkpoint_experts_are_the_trained_ones_after_a_rechoice(tmp_path):
    """Saved right after the monitor changed the hot experts: the checkpoint's experts are the model's."""
    trained = {}

    def capture(trainer):
        trained.update({n: p.asnumpy() for n, p in trainer.model.parameters_and_names()})

    from workers.training_checks import train
    config = make_config(steps=3, output_dir=str(tmp_path), eval_interval=None, eval_iters=0,
                         model_options=moe_checks.moe_options(2, **{**HOT_DROPS, "hot_expert_update_step": 1}))
    train(config, on_finish=capture)
    model = load_file(str(tmp_path / "iter_0000003" / "mp_rank_00" / "model.safetensors"))
    assert set(model) == set(trained)
    for name, value in trained.items():
        np.testing.assert_array_equal(model[name], value, err_msg=name)


def test_monitor_and_hot_expert_settings_are_checked(world_of_one):
    config = make_config(steps=1, model_options=moe_checks.moe_options(2, **HOT_DROPS))
    model = GPTModel(config.model_config)
    trainer = type("T", (), {"chunks": [model]})()
    state = TrainState(trainer, config, 0, 0)
    monitor = ColdHotExpertMonitor(moe_config={"update_step": 5, "moe_module_name": "language_model.encoder.layers"},
                                   hidden_size=32, ffn_hidden_size=64, expert_parallel=1, model_parallel=1,
                                   save_checkpoint_steps=100)
    monitor.on_train_begin(state)
    assert monitor.update_step == 5 and sorted(monitor.layers) == [0, 1]
    for kwargs, message in ((dict(hidden_size=64), "hidden_size 64 but the run has 32"),
                            (dict(expert_parallel=2), "expert_parallel 2 but the run has 1"),
                            (dict(moe_config={"hot_expert_num": 2}), "hot_expert_num 2 but the model was built with 1"),
                            (dict(moe_config={"moe_module_name": "language_model.decoder"}), "is not a cell")):
        with pytest.raises(ValueError, match=message):
            ColdHotExpertMonitor(**kwargs).on_train_begin(state)
    plain = make_config(steps=1, model_options=moe_checks.moe_options(2))
    with pytest.raises(ValueError, match="needs hot experts: set --enable-cold-hot-expert"):
        ColdHotExpertMonitor().on_train_begin(TrainState(trainer, plain, 0, 0))


@pytest.mark.parametrize("settings,message", [
    (dict(hot_expert_num=0), "--hot-expert-num"),
    (dict(hot_expert_num=5), "between 1 and --num-experts 4"),
    (dict(hot_expert_num=1, cold_token_percent=0.0), "--cold-token-percent"),
    (dict(hot_expert_num=1, cold_token_percent=0.5), "the run is dropless"),
    (dict(hot_expert_num=1, moe_token_dispatcher_type="allgather"), "needs --moe-token-dispatcher-type alltoall"),
    (dict(hot_expert_num=1, hot_expert_update_step=-1), "--hot-expert-update-step"),
])
def test_bad_hot_expert_settings_name_the_flag(settings, message):
    moe = {"num_experts": 4, "moe_token_dispatcher_type": "alltoall", "enable_cold_hot_expert": True, **settings}
    with pytest.raises(ValueError, match=message):
        model_config("llama", moe_config=MoEConfig(**moe))


def test_hot_experts_need_whole_experts_and_the_tools_an_moe_model():
    cfg = model_config("llama", sequence_parallel=True, moe_config=MoEConfig(
        num_experts=4, enable_cold_hot_expert=True, hot_expert_num=1, **ALLTOALL))
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 1"):
        cfg.validate_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=1, expert_tensor_parallel_size=2)
    cfg.validate_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    with pytest.raises(ValueError, match="--save-token-distribution need an MoE model"):
        model_config("llama", moe_config=MoEConfig(save_token_distribution=True))
    config = make_config(steps=1, model_options=moe_checks.moe_options(2, save_token_distribution=True))
    with pytest.raises(ValueError, match="needs a directory: set --token-distribution-dir"):
        build_callbacks(config)


def test_force_biased_router_skews_the_load_with_a_bias_drawn_once(world_of_one):
    """Megatron's --moe-router-force-biased: random logits plus a per-expert bias; a negative std keeps the
    bias for the run, so a few experts get most tokens, the same ones at every call."""
    moe = MoEConfig(num_experts=8, moe_router_topk=2, moe_router_force_biased=-3.0)
    cfg = model_config("llama", hidden_size=8, num_attention_heads=2, num_query_groups=1, moe_config=moe)
    router = TopKRouter(cfg, cfg.moe_config, layer_number=1)
    x = Tensor(np.random.default_rng(0).normal(size=(64, 2, 8)).astype(np.float32))
    loads = []
    for _ in range(2):
        with tp.forward_pass():
            _, routing_map = router(x)
        loads.append(routing_map.sum(0))
    bias = router._forced_bias
    top2 = np.sort(loads[0])[-2:].sum() / loads[0].sum()
    assert top2 > 0.6 and set(np.argsort(-loads[0])[:2]) == set(np.argsort(-loads[1])[:2]) == \
        set(np.argsort(-bias)[:2])
    assert not np.array_equal(loads[0], loads[1])  # the logits themselves are random at every call
    with pytest.raises(ValueError, match="negative std"):
        model_config("llama", moe_config=MoEConfig(num_experts=4, moe_router_force_biased=1.0,
                                                   moe_layer_recompute=True))
