"""GPTModel under tensor parallelism (with and without sequence parallel) and split into two pipeline stages
(also with Megatron-Core's placements), against the single-process model: logits, loss and every
parameter's gradient (fp32, 1e-5 relative)."""
from conftest import assert_all_close, worst_errors


def test_tensor_and_sequence_parallel_match_single_process(model_checks_2):
    errors = worst_errors(model_checks_2)
    required = []
    for name in ("gpt2", "llama"):
        for mode in ("tp2", "tp2_sp"):
            required += [f"{name}/{mode}/loss", f"{name}/{mode}/logits",
                         f"{name}/{mode}/grad/language_model.embedding.word_embeddings.weight",
                         f"{name}/{mode}/grad/language_model.encoder.layers.1.self_attention.query_key_value.weight",
                         f"{name}/{mode}/grad/language_model.encoder.layers.0.mlp.dense_h_to_4h.weight",
                         f"{name}/{mode}/grad/language_model.encoder.layers.0.input_norm.weight",
                         f"{name}/{mode}/grad/language_model.encoder.final_norm.weight"]
    required += ["llama/tp2/grad/language_model.output_layer.weight",
                 "gpt2/tp2_sp/grad/language_model.encoder.layers.0.mlp.dense_4h_to_h.bias",
                 "gpt2/tp2/grad/language_model.embedding.position_embeddings.weight"]
    for name in ("gptoss", "qwen"):  # Megatron-Core's options: sinks, window, YaRN, QK norm, output gate
        for mode in ("tp2", "tp2_sp"):
            required += [f"{name}/{mode}/loss", f"{name}/{mode}/logits",
                         f"{name}/{mode}/grad/language_model.encoder.layers.0.self_attention.query_key_value.weight"]
        required += [f"gptoss/{mode}/grad/language_model.encoder.layers.1.self_attention.core_attention.softmax_offset"
                     for mode in ("tp2", "tp2_sp")]
        required += [f"qwen/{mode}/grad/language_model.encoder.layers.0.self_attention.{qk}_layernorm.weight"
                     for mode in ("tp2", "tp2_sp") for qk in "qk"]
    grads = [n for n in errors if "/grad/" in n]
    # every parameter: gpt2 28, llama 15, gptoss 19 (qkv biases, softmax offsets), qwen 19 (q/k norms)
    assert len(grads) == 2 * (28 + 15 + 19 + 19), f"{len(grads)} gradient checks ran, expected every parameter"
    assert_all_close({n: e for n, e in errors.items() if "/pp2" not in n}, 1e-5, required)


def test_two_pipeline_stages_give_the_whole_models_loss(model_checks_2):
    errors = worst_errors(model_checks_2)
    required = ["gpt2/pp2/loss", "llama/pp2/loss", "gpt2/pp2/stage_layers", "gpt2/pp2/tied_copy"]
    for tag in ("llama/pp2_layout", "options/pp2_account_loss", "qwen/pp2_first1"):
        required += [f"{tag}/loss", f"{tag}/stage_layers", f"{tag}/last_stage_layers"]
    assert_all_close({n: e for n, e in errors.items() if "/pp2" in n}, 1e-5, required)
