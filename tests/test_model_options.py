"""Megatron-Core core_r0.19.0's model options in one process, against the independent float64 numpy GPT
(tests/reference_gpt.py): logits and loss with perturbed weights (so zero-centred norms, softmax offsets and
gates are not at their trivial start values), each option changing the reference's output, the per-token
loss, initialisation rules, the sliding window's reach, parameter names and the configuration errors."""
import dataclasses

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from model_configs import batch, make_config
from numerics import rel_err
from reference_gpt import reference_logits, reference_loss
from mindtron.legacy_model import GPTModel, TransformerConfig
from mindtron.legacy_model.rotary import llama3_scaled_inv_freq, yarn_inv_freq, yarn_mscale
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp

NEW = ("gptoss", "qwen", "options2")


@pytest.fixture(autouse=True)
def world_of_one():
    ps.initialize_model_parallel()
    tp.model_parallel_seed(1234)
    yield
    ps.destroy_model_parallel()


def perturbed_model(cfg, seed=5):
    """A model whose every parameter is moved away from its initial value (norm weights, biases, softmax
    offsets by O(0.3), matrices by a tenth of their scale)."""
    model = GPTModel(cfg)
    rng = np.random.default_rng(seed)
    for p in model.trainable_params():
        value = p.asnumpy()
        spread = 0.3 if value.ndim == 1 else 0.1 * max(float(np.abs(value).std()), 1e-3)
        p.set_data(Tensor(value + rng.normal(0.0, spread, value.shape).astype(np.float32)))
    return model


def params_of(model):
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


@pytest.mark.parametrize("name", NEW)
def test_logits_loss_and_per_token_loss_match_the_numpy_reference(name):
    cfg = make_config(name)
    model = perturbed_model(cfg)
    tokens, labels = batch(cfg)
    want = reference_logits(cfg, params_of(model), tokens)
    assert rel_err(model(Tensor(tokens, ms.int32)).asnumpy(), want) < 1e-5
    loss_mask = (np.arange(tokens.size).reshape(tokens.shape) % 3 != 0).astype(np.float32)
    args = dict(labels=Tensor(labels, ms.int32), loss_mask=Tensor(loss_mask))
    loss = float(model(Tensor(tokens, ms.int32), **args).asnumpy())
    assert loss == pytest.approx(reference_loss(want, labels, loss_mask), rel=1e-5)
    # --calculate-per-token-loss: the same model returns the masked sum
    model.config.calculate_per_token_loss = True
    total = float(model(Tensor(tokens, ms.int32), **args).asnumpy())
    assert total == pytest.approx(reference_loss(want, labels, loss_mask, per_token=True), rel=1e-5)
    assert total == pytest.approx(loss * loss_mask.sum(), rel=1e-5)


# Each option switched off in the reference must change its logits well beyond the 1e-5 comparison
# tolerance, so the comparison above tests it.
OPTIONS = [
    ("gptoss", dict(position_embedding_type="rope")), ("gptoss", dict(yarn_mscale=0.0)),
    ("gptoss", dict(window_size=None, window_attn_skip_freq=None)), ("gptoss", dict(window_attn_skip_freq=None)),
    ("gptoss", dict(softmax_type="vanilla")), ("gptoss", dict(activation_func_clamp_value=None)),
    ("gptoss", dict(glu_linear_offset=0.0)),
    ("qwen", dict(qk_layernorm=False)), ("qwen", dict(rotary_interleaved=False)),
    ("qwen", dict(use_rope_scaling=False)),
    ("qwen", dict(no_rope_freq=None)), ("qwen", dict(layernorm_zero_centered_gamma=False)),
    ("options2", dict(qk_l2_norm=False)), ("options2", dict(rotary_seq_len_interpolation_factor=None)),
    ("options2", dict(softmax_type="vanilla")), ("options2", dict(bias_swiglu_fusion=True, glu_linear_offset=0.0,
                                                                  activation_func_clamp_value=None)),
    ("options2", dict(window_size=None)),
]


@pytest.mark.parametrize("name, off", OPTIONS, ids=[f"{n}-{'-'.join(o)}" for n, o in OPTIONS])
def test_each_option_changes_the_reference_output(name, off):
    cfg = make_config(name)
    params = params_of(perturbed_model(cfg))
    tokens, _ = batch(cfg)
    with_option = reference_logits(cfg, params, tokens)
    without = reference_logits(dataclasses.replace(cfg, **off), params, tokens)
    assert without.shape == with_option.shape  # rel_err is inf on a mismatch, which would pass the next line
    assert rel_err(without, with_option) > 1e-4  # ten times the comparison tolerance


def test_attention_output_gate_and_qk_norm_parameters():
    names = params_of(GPTModel(make_config("qwen")))
    qkv = names["language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    # 2 groups x (2 query heads + 2 gates + key + value) x 8 channels
    assert qkv.shape == (2 * 6 * 8, 32)
    for which in ("q", "k"):
        weight = names[f"language_model.encoder.layers.1.self_attention.{which}_layernorm.weight"]
        assert weight.shape == (8,) and not weight.any()  # RMSNorm, zero-centred: stored gamma - 1 = 0
    assert not any("layernorm" in n for n in params_of(GPTModel(make_config("options2"))))  # L2 norm: no weights
    offsets = params_of(GPTModel(make_config("gptoss")))
    assert offsets["language_model.encoder.layers.0.self_attention.core_attention.softmax_offset"].shape == (4,)


def test_zero_centred_norms_start_at_zero_and_sandwich_scale_minus_one():
    p = params_of(GPTModel(make_config("options2")))
    assert not p["language_model.encoder.layers.0.input_norm.weight"].any()
    assert not p["language_model.encoder.final_norm.weight"].any()
    np.testing.assert_array_equal(p["language_model.encoder.layers.0.attn_post_norm.weight"], -0.5)


def test_initialisation_methods():
    xavier = params_of(GPTModel(make_config("options2")))
    qkv = xavier["language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    bound = np.sqrt(6.0 / (qkv.shape[0] + qkv.shape[1]))
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound  # Glorot-uniform over the full tensor
    dense = xavier["language_model.encoder.layers.0.mlp.dense_4h_to_h.weight"]
    assert np.abs(dense).max() <= np.sqrt(6.0 / sum(dense.shape))
    emb = xavier["language_model.embedding.word_embeddings.weight"]
    assert emb.std() == pytest.approx(0.5, rel=0.05)  # --embedding-init-method-std
    # Glorot-uniform embeddings when the embedding std is left at init_method_std (Megatron-Core's rule)
    same_std = params_of(GPTModel(make_config("options2", embedding_init_method_std=None)))
    emb = same_std["language_model.embedding.word_embeddings.weight"]
    assert np.abs(emb).max() <= np.sqrt(6.0 / sum(emb.shape))
    normal = params_of(GPTModel(make_config("gpt2", embedding_init_method_std=0.3)))
    assert normal["language_model.embedding.position_embeddings.weight"].std() == pytest.approx(0.3, rel=0.1)
    assert normal["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].std() == pytest.approx(0.05, rel=0.1)


def test_sliding_window_reach():
    """A token more than LEFT positions back does not reach a window layer: with every layer windowed
    (depth 2, window 3) position s-1 sees only positions >= s-1-6."""
    cfg = make_config("gpt2", window_size=(3, 0))
    model = GPTModel(cfg)
    tokens, _ = batch(cfg)
    changed = tokens.copy()
    changed[:, :8] = (changed[:, :8] + 1) % cfg.vocab_size  # positions 0..7: more than 6 back from 15
    a, b = model(Tensor(tokens, ms.int32)).asnumpy(), model(Tensor(changed, ms.int32)).asnumpy()
    np.testing.assert_allclose(a[:, 14:], b[:, 14:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[:, 13], b[:, 13])  # 13 - 6 = 7: reached
    full = GPTModel(make_config("gpt2"))
    assert not np.allclose(full(Tensor(tokens, ms.int32)).asnumpy()[:, 15],
                           full(Tensor(changed, ms.int32)).asnumpy()[:, 15])


def test_rope_frequency_variants():
    inv = 1.0 / 500000 ** (np.arange(0, 128, 2) / 128)
    scaled = llama3_scaled_inv_freq(inv.astype(np.float32), 8.0)
    wavelength = 2 * np.pi / inv
    np.testing.assert_allclose(scaled[wavelength < 2048], inv[wavelength < 2048], rtol=1e-6)
    np.testing.assert_allclose(scaled[wavelength > 8192], inv[wavelength > 8192] / 8, rtol=1e-6)
    middle = (wavelength >= 2048) & (wavelength <= 8192)
    assert middle.any() and np.all((scaled[middle] <= inv[middle]) & (scaled[middle] >= inv[middle] / 8))
    # YaRN with factor 1 leaves the frequencies alone; its temperature is 0.1 ln s + 1 with the defaults
    np.testing.assert_allclose(yarn_inv_freq(64, 10000.0, 1.0, 4096, 32.0, 1.0, True),
                               1.0 / 10000 ** (np.arange(0, 64, 2) / 64), rtol=1e-6)
    assert yarn_mscale(40.0, 1.0, 0.0) == pytest.approx(0.1 * np.log(40.0) + 1)
    assert yarn_mscale(40.0, 1.0, 1.0) == 1.0 and yarn_mscale(1.0, 0.7, 0.0) == 1.0


COMMON = dict(vocab_size=128, hidden_size=32, seq_length=16, num_layers=4, num_attention_heads=4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(softmax_type="sink"), "--softmax-type"),
    (dict(softmax_type="learnable", init_method_xavier_uniform=True), "--init-method-xavier-uniform"),
    (dict(window_size=(4,)), "--window-size"),
    (dict(window_attn_skip_freq=2), "--window-attn-skip-freq needs --window-size"),
    (dict(window_size=(4, 0), window_attn_skip_freq=[1, 0]), "one 0/1 entry per layer"),
    (dict(no_rope_freq=3, position_embedding_type="rope"), "--no-rope-freq=3 should divide --num-layers 4"),
    (dict(position_embedding_type="yarn", rotary_interleaved=True), "--rotary-interleaved"),
    (dict(glu_linear_offset=1.0), "--glu-linear-offset applies to gated MLPs"),
    (dict(hidden_act="swiglu", glu_linear_offset=1.0), "--no-bias-swiglu-fusion"),
    (dict(activation_func_clamp_value=-1.0, hidden_act="quick_geglu"), "--activation-func-clamp-value"),
    (dict(num_layers_in_first_pipeline_stage=0), "--decoder-first-pipeline-num-layers must be larger than 0"),
    (dict(num_layers_in_first_pipeline_stage=1, account_for_loss_in_pipeline_split=True), "cannot be combined"),
    (dict(pipeline_model_parallel_layout="Et|tX|tL"), "unknown layer character"),
    (dict(pipeline_model_parallel_layout="Ett|ttL", num_layer_list=[2, 2]), "cannot be combined"),
])
def test_bad_option_values_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**COMMON, **kwargs})


def test_per_layer_patterns():
    cfg = TransformerConfig(**COMMON, position_embedding_type="rope", no_rope_freq=2, window_size=(2, 0),
                            window_attn_skip_freq=4)
    assert cfg.no_rope_freq == [0, 1, 0, 1] and [cfg.layer_uses_rope(i) for i in range(1, 5)] == [True, False] * 2
    assert cfg.window_attn_skip_freq == [1, 1, 1, 0] and cfg.layer_window(4) is None and cfg.layer_window(1) == (2, 0)
    listed = TransformerConfig(**COMMON, window_size=(2, 0), window_attn_skip_freq=[0, 1, 0, 1])
    assert [listed.layer_window(i) for i in range(1, 5)] == [None, (2, 0), None, (2, 0)]


def test_pipeline_layer_placement_follows_megatron_core():
    from mindtron.legacy_model.pipeline_layout import layout_virtual_size, pipeline_layer_counts
    from mindtron.legacy_model import stage_layer_range

    # --decoder-first/last-pipeline-num-layers: the middle stages split the rest evenly
    assert pipeline_layer_counts(10, 4, first_stage_layers=1, last_stage_layers=3) == [[1, 3, 3, 3]]
    assert pipeline_layer_counts(9, 3, first_stage_layers=1) == [[1, 4, 4]]
    # ... with virtual stages each rank's share is split over its chunks
    assert pipeline_layer_counts(16, 4, 2, first_stage_layers=2, last_stage_layers=2) == [[1, 3, 3, 1]] * 2
    # Megatron's offsets for that case: chunk v of rank r starts at 8 v + (0, 1, 4, 7)[r]
    assert [stage_layer_range(16, 4, r, 2, v, first_stage_layers=2, last_stage_layers=2)[0]
            for v in range(2) for r in range(4)] == [0, 1, 4, 7, 8, 9, 12, 15]
    # --account-for-embedding/loss-in-pipeline-split: they take a layer's place on the first / last piece
    assert pipeline_layer_counts(6, 4, account_for_embedding=True, account_for_loss=True) == [[1, 2, 2, 1]]
    assert pipeline_layer_counts(14, 4, 2, account_for_embedding=True, account_for_loss=True) == \
        [[1, 2, 2, 2], [2, 2, 2, 1]]
    assert stage_layer_range(14, 4, 0, 2, 1, account_for_embedding=True, account_for_loss=True) == (7, 2)
    # --pipeline-model-parallel-layout: stage i is virtual stage i // pp of rank i % pp
    layout = "Et|(tt|)*2,tL"
    assert layout_virtual_size(layout, 2) == 2 and layout_virtual_size("Ett|ttL", 2) is None
    assert pipeline_layer_counts(6, 2, 2, layout=layout) == [[1, 2], [2, 1]]
    assert pipeline_layer_counts(2, 2, layout=[["embedding"], ["decoder", "decoder", "loss"]]) == [[0, 2]]
    for bad, message in (("tE|ttL", "must open the first stage"), ("Et|tt", "exactly once"),
                         ("Et|tLm", "multi-token prediction"), ("Et|ttL", "places 3 transformer layers")):
        with pytest.raises(ValueError, match=message):
            pipeline_layer_counts(2, 2, layout=bad)
    with pytest.raises(ValueError, match="middle pipeline stages"):
        pipeline_layer_counts(10, 4, first_stage_layers=1, last_stage_layers=2)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        pipeline_layer_counts(6, 4, account_for_embedding=True)
