"""GPTModel in one process: logits against the independent numpy GPT, masks, loss mask, dtype options,
fused-kernel flags, layer ranges and config errors."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from model_configs import CONFIGS, batch, make_config
from numerics import rel_err
from reference_gpt import reference_logits, reference_loss
from mindtron.legacy_model import (GPTModel, TransformerConfig, get_ltor_masks_and_position_ids, pad_vocab_size,
                                   stage_layer_range)
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp


@pytest.fixture(autouse=True)
def world_of_one():
    ps.initialize_model_parallel()
    tp.model_parallel_seed(1234)
    yield
    ps.destroy_model_parallel()


def full_params(model):
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_loss_match_numpy_reference(name):
    cfg = make_config(name)
    model = GPTModel(cfg)
    tokens, labels = batch(cfg)
    logits = model(Tensor(tokens, ms.int32)).asnumpy()
    want = reference_logits(cfg, full_params(model), tokens)
    assert logits.shape == (2, cfg.seq_length, cfg.vocab_size)
    assert rel_err(logits, want) < 1e-5
    loss = model(Tensor(tokens, ms.int32), labels=Tensor(labels, ms.int32)).asnumpy()
    assert abs(loss - reference_loss(want, labels)) / reference_loss(want, labels) < 1e-5


def test_parameter_names_are_megatrons():
    names = set(full_params(GPTModel(make_config("gpt2"))))
    for expected in ["language_model.embedding.word_embeddings.weight",
                     "language_model.embedding.position_embeddings.weight",
                     "language_model.encoder.layers.1.input_norm.weight",
                     "language_model.encoder.layers.0.self_attention.query_key_value.weight",
                     "language_model.encoder.layers.0.self_attention.dense.weight",
                     "language_model.encoder.layers.0.post_attention_norm.weight",
                     "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight",
                     "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight",
                     "language_model.encoder.final_norm.weight"]:
        assert expected in names
    llama = full_params(GPTModel(make_config("llama")))
    assert llama["language_model.output_layer.weight"].shape == (128, 32)
    # GQA: 4 query heads + 2 key + 2 value heads of width 8; SwiGLU: [gate; up] of 48 each
    assert llama["language_model.encoder.layers.0.self_attention.query_key_value.weight"].shape == (64, 32)
    assert llama["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (96, 32)
    assert not any(n.endswith(".bias") for n in llama if "norm" not in n)


def test_same_seed_same_model_and_parameters_differ_by_name():
    a, b = full_params(GPTModel(make_config("gpt2"))), full_params(GPTModel(make_config("gpt2")))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    w = "language_model.encoder.layers.{}.mlp.dense_h_to_4h.weight"
    assert not np.array_equal(a[w.format(0)], a[w.format(1)])


def test_eod_mask_resets_attention_and_positions_per_document():
    eod = 0
    tokens = np.array([[5, 6, eod, 7, 8, 9, eod, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask, loss_mask, pos = get_ltor_masks_and_position_ids(tokens, eod, True, True, True)
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(pos[1], np.arange(8))
    np.testing.assert_array_equal(loss_mask[0], [1, 1, 0, 1, 1, 1, 0, 1])
    allowed = ~mask[0, 0]
    assert allowed[2, :3].all() and not allowed[3, 2] and allowed[3, 3] and not allowed[7, 6] and allowed[7, 7]
    assert (allowed[:, :] == np.tril(allowed)).all()  # still causal
    np.testing.assert_array_equal(~mask[1, 0], np.tril(np.ones((8, 8), bool)))
    shared, _, pos_plain = get_ltor_masks_and_position_ids(tokens, eod)
    assert shared.shape == (1, 1, 8, 8) and (pos_plain == np.arange(8)).all()


def test_model_with_eod_treats_documents_independently():
    """With reset masks and positions, a document's logits do not depend on the document before it."""
    cfg = make_config("gpt2")
    eod = 0
    model = GPTModel(cfg, eod=eod, reset_position_ids=True)
    rng = np.random.default_rng(3)
    doc = rng.integers(1, 128, 9)
    first_a, first_b = rng.integers(1, 128, 6), rng.integers(1, 128, 6)
    tokens = np.stack([np.concatenate([first_a, [eod], doc]), np.concatenate([first_b, [eod], doc])])
    logits = model(Tensor(tokens, ms.int32)).asnumpy()
    np.testing.assert_allclose(logits[0, 7:], logits[1, 7:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits[0, :7], logits[1, :7])
    mask, _, pos = get_ltor_masks_and_position_ids(tokens, eod, True, True)
    want = reference_logits(cfg, full_params(model), tokens, pos, mask)
    assert rel_err(logits, want) < 1e-5


def test_loss_mask_excludes_tokens():
    cfg = make_config("gpt2")
    model = GPTModel(cfg)
    tokens, labels = batch(cfg)
    loss_mask = np.ones(tokens.shape, np.float32)
    loss_mask[:, ::2] = 0
    loss = model(Tensor(tokens, ms.int32), labels=Tensor(labels, ms.int32),
                 loss_mask=Tensor(loss_mask)).asnumpy()
    want_logits = reference_logits(cfg, full_params(model), tokens)
    want = reference_loss(want_logits, labels, loss_mask)
    assert abs(loss - want) / want < 1e-5
    assert abs(want - reference_loss(want_logits, labels)) > 1e-4  # the mask matters


@pytest.mark.parametrize("options", [
    dict(compute_dtype="float16"),
    dict(compute_dtype="float16", fp32_residual_connection=True, attention_softmax_in_fp32=True),
    dict(compute_dtype="float16", fp16_lm_cross_entropy=True),
    dict(params_dtype="float16", compute_dtype="float16", embedding_init_dtype="float16"),
])
def test_half_precision_options_run_close_to_fp32(options):
    tokens, labels = batch(make_config("llama"))
    ref = GPTModel(make_config("llama"))(Tensor(tokens, ms.int32), labels=Tensor(labels, ms.int32)).asnumpy()
    model = GPTModel(make_config("llama", **options))
    loss, grads = ms.value_and_grad(lambda t, l: model(t, labels=l), None, model.trainable_params())(
        Tensor(tokens, ms.int32), Tensor(labels, ms.int32))
    assert abs(float(loss) - ref) / ref < 5e-3
    assert all(np.isfinite(g.asnumpy().astype(np.float32)).all() for g in grads)


def test_fused_kernel_flags_compute_the_same_on_cpu():
    tokens, _ = batch(make_config("llama"))
    plain = GPTModel(make_config("llama"))(Tensor(tokens, ms.int32)).asnumpy()
    fused = GPTModel(make_config("llama", use_flash_attention=True, apply_rope_fusion=True,
                                 apply_swiglu_fusion=True, use_fused_rmsnorm=True))(Tensor(tokens, ms.int32))
    np.testing.assert_array_equal(plain, fused.asnumpy())


def test_stage_layer_ranges():
    assert [stage_layer_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # interleaved: chunk v of stage p holds layers (v * 4 + p) * 1 ... with 8 layers, pp 4, vpp 2
    assert [stage_layer_range(8, 4, p, 2, v) for v in range(2) for p in range(4)] == \
        [(i, 1) for i in range(8)]
    assert [stage_layer_range(16, 2, p, 2, v) for v in range(2) for p in range(2)] == \
        [(0, 4), (4, 4), (8, 4), (12, 4)]
    assert [stage_layer_range(7, 3, r, num_layer_list=[3, 2, 2]) for r in range(3)] == [(0, 3), (3, 2), (5, 2)]
    nested = [[2, 2], [2, 1]]
    assert [stage_layer_range(7, 2, p, 2, v, nested) for v in range(2) for p in range(2)] == \
        [(0, 2), (2, 2), (4, 2), (6, 1)]
    with pytest.raises(ValueError, match="--num-layers 7 cannot be split evenly"):
        stage_layer_range(7, 2, 0)
    with pytest.raises(ValueError, match="summing to --num-layers 7"):
        stage_layer_range(7, 3, 0, num_layer_list=[3, 3, 3])


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 8) == 51200
    assert pad_vocab_size(256, 128, 2) == 256


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_attention_heads=6, hidden_size=32), "--hidden-size 32 is not divisible by --num-attention-heads 6"),
    (dict(num_attention_heads=4, group_query_attention=True, num_query_groups=3), "--num-query-groups 3 must divide"),
    (dict(hidden_act="relu6"), "hidden_act 'relu6' is not supported"),
    (dict(normalization="BatchNorm"), "--normalization"),
    (dict(position_embedding_type="alibi"), "--position-embedding-type"),
    (dict(fp16_lm_cross_entropy=True), "--fp16-lm-cross-entropy needs fp16"),
    (dict(recompute_granularity="full"), "--recompute-method"),
    (dict(seq_length=64, max_position_embeddings=32), "exceeds --max-position-embeddings"),
])
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{"vocab_size": 128, "hidden_size": 32, "seq_length": 16, "num_layers": 2,
                             "num_attention_heads": 4, **kwargs})


def test_tensor_parallel_divisibility_is_checked():
    cfg = make_config("gpt2", num_attention_heads=2)
    with pytest.raises(ValueError, match="--num-attention-heads = 2 is not divisible by --tensor-model-parallel-size 4"):
        cfg.validate_parallel(4)
    with pytest.raises(ValueError, match="--num-query-groups"):
        make_config("llama").validate_parallel(4)
    with pytest.raises(ValueError, match="bfloat16"):
        make_config("gpt2", compute_dtype="bf16").validate_parallel(1)


def test_dropout_in_training_only_and_recompute_keeps_gradients():
    cfg = make_config("gpt2", hidden_dropout_rate=0.2, attention_dropout_rate=0.2)
    model = GPTModel(cfg)
    tokens, _ = batch(cfg)
    model.set_train(False)
    a, b = model(Tensor(tokens, ms.int32)).asnumpy(), model(Tensor(tokens, ms.int32)).asnumpy()
    np.testing.assert_array_equal(a, b)
    model.set_train(True)
    assert not np.array_equal(model(Tensor(tokens, ms.int32)).asnumpy(), a)

@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform"),
                                       dict(recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="selective")])
def test_recompute_with_dropout_keeps_loss_and_gradients(recompute):
    """The recompute pass replays the forward's dropout masks, so gradients equal the plain run's."""
    dropout = dict(hidden_dropout_rate=0.2, attention_dropout_rate=0.2)
    tokens, labels = batch(make_config("gpt2"))
    results = []
    for options in ({}, recompute):
        tp.model_parallel_seed(99)
        model = GPTModel(make_config("gpt2", **dropout, **options))
        model.set_train(True)
        results.append(ms.value_and_grad(lambda t, l: model(t, labels=l), None, model.trainable_params())(
            Tensor(tokens, ms.int32), Tensor(labels, ms.int32)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert float(loss_a) == float(loss_b)
    for g1, g2 in zip(grads_a, grads_b):
        np.testing.assert_allclose(g1.asnumpy(), g2.asnumpy(), rtol=1e-5, atol=1e-7)
