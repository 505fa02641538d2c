"""Pipeline schedules (1F1B and interleaved virtual stages) against the single-stage model: each
micro-batch's loss and every parameter's gradient summed over micro-batches (fp32, 1e-5), tied embeddings
summed over the embedding group, and the number of micro-batch inputs held at once."""
import pytest

from conftest import assert_all_close, worst_errors

LAYOUTS = {2: ["pp2_gpt2", "pp2_llama", "pp2_vpp2_gpt2"], 3: ["pp3_uneven_gpt2"],
           4: ["pp4_gpt2", "pp2_tp2_sp_llama", "pp4_vpp2_gpt2"]}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_schedules_match_single_stage(pipeline_checks, world):
    errors = worst_errors(pipeline_checks[world])
    required = []
    for layout in LAYOUTS[world]:
        required += [f"{layout}/losses", f"{layout}/in_flight_over_limit",
                     f"{layout}/grad/language_model.embedding.word_embeddings.weight",
                     f"{layout}/grad/language_model.encoder.layers.0.self_attention.query_key_value.weight",
                     f"{layout}/grad/language_model.encoder.final_norm.weight"]
    required += [f"{layout}/grad/language_model.encoder.layers.3.mlp.dense_4h_to_h.weight"
                 for layout in LAYOUTS[world]]
    if world == 2:
        required.append("pp2_vpp2/odd_microbatches_refused")
    assert_all_close(errors, 1e-5, required)
