"""MoE flags and document 000/001's moe_config YAML section land in model_config.moe_config; contradictory
settings fail at parse time, naming the flag, before any process group exists."""
import pytest

from mindtron.training import flag_policy as P
from mindtron.training import megatron_flags as mf
from mindtron.training.arguments import init_configs_from_args, parse_args

pytestmark = pytest.mark.filterwarnings("ignore::mindtron.training.arguments.NotImplementedFlagWarning")

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "3", "--disable-bias-linear",
        "--swiglu", "--ffn-hidden-size", "128"]

# A Mixtral-8x7B style MoE block of Megatron-LM's MoE examples, at tiny sizes.
MIXTRAL = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
           "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
           "--moe-z-loss-coeff", "1e-3", "--moe-layer-freq", "([0]+[1]*3)", "--moe-ffn-hidden-size", "96",
           "--moe-router-dtype", "fp32", "--moe-per-layer-logging", "--moe-permute-fusion"]


def moe(extra, world_size=1):
    return init_configs_from_args(parse_args(args=BASE + extra, world_size=world_size)).model_config.moe_config


def test_megatron_moe_flags_land_in_moe_config():
    m = moe(MIXTRAL + ["--expert-model-parallel-size", "2"], world_size=2)
    assert (m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == (8, 2, 96)
    assert m.moe_layer_freq == [0, 1, 1, 1] and m.moe_router_load_balancing_type == "aux_loss"
    assert m.moe_aux_loss_coeff == 0.01 and m.moe_z_loss_coeff == 1e-3
    assert (m.moe_token_dispatcher_type, m.moe_grouped_gemm, m.moe_router_dtype) == ("alltoall", True, "fp32")
    assert m.moe_per_layer_logging and m.moe_expert_capacity_factor is None  # dropless by default
    assert P.policy(mf.FLAGS_BY_OPTION["--moe-permute-fusion"]).status == P.IGNORED  # same maths, accepted


def test_moe_ffn_defaults_to_ffn_and_the_dense_model_has_no_experts():
    assert moe(["--num-experts", "4"]).moe_ffn_hidden_size == 128
    assert not moe([]).enabled


def test_first_k_dense_replace_and_lists_of_aux_losses():
    m = moe(["--num-experts", "4", "--first-k-dense-replace", "1", "--moe-router-load-balancing-type",
             "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff", "0.01", "0.001"])
    assert m.moe_layer_freq == [0, 1, 1, 1]
    assert m.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"] and m.moe_aux_loss_coeff == [0.01, 0.001]
    assert m.tracked_losses() == ["load_balancing_loss", "seq_load_balancing_loss"]


MOE_YAML = """
moe_config:
  expert_num: 8
  num_experts_chosen: 2
  capacity_factor: 1.5
  aux_loss_factor: 0.01
  routing_policy: TopkRouterV2
  enable_sdrop: true
  use_gmm: true
  enable_gmm_safe_tokens: true
  moe_intermediate_size: 32
  shared_expert_num: 2
  use_shared_expert_gating: true
  topk_method: group_limited_greedy
  n_group: 4
  topk_group: 2
  routed_scaling_factor: 2.5
  use_gating_sigmoid: true
  balance_via_topk_bias: true
  topk_bias_update_rate: 0.001
  first_k_dense_replace: 1
  z_loss_factor: 0.0
  comp_comm_parallel: true        # MindFormers' overlap: accepted, no effect
"""


def test_document_moe_config_section_maps_to_the_same_fields(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text(MOE_YAML)
    m = moe(["--yaml-cfg", str(path)])
    assert (m.num_experts, m.moe_router_topk, m.moe_expert_capacity_factor) == (8, 2, 1.5)
    assert m.moe_token_drop_policy == "position" and m.moe_pad_expert_input_to_capacity  # enable_sdrop
    assert m.moe_grouped_gemm and m.enable_gmm_safe_tokens and m.moe_ffn_hidden_size == 32
    assert m.moe_shared_expert_intermediate_size == 64 and m.moe_shared_expert_gate
    assert (m.moe_router_num_groups, m.moe_router_group_topk, m.moe_router_topk_scaling_factor) == (4, 2, 2.5)
    assert m.moe_router_score_function == "sigmoid" and m.moe_router_enable_expert_bias
    assert m.moe_layer_freq == [0, 1, 1, 1] and m.moe_z_loss_coeff is None
    # the same section inside model_config, and a negative capacity factor (MindFormers' dropless)
    path.write_text("model_config:\n  moe_config:\n    expert_num: 4\n    capacity_factor: -1\n")
    assert moe(["--yaml-cfg", str(path)]).moe_expert_capacity_factor is None


@pytest.mark.parametrize("text,message", [
    ("moe_config:\n  expert_num: 4\n  expert_numbr: 2\n", "moe_config.expert_numbr"),
    ("moe_config:\n  expert_num: 4\n  aux_loss_types: [device]\n", "aux_loss_types"),
    ("moe_config:\n  expert_num: 4\n  routing_policy: TopkRouterV9\n", "routing_policy"),
])
def test_moe_config_section_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(args=BASE + ["--yaml-cfg", str(path)], world_size=1)


@pytest.mark.parametrize("extra,world,message", [
    (["--num-experts", "4", "--moe-router-topk", "6"], 1, "--moe-router-topk 6"),
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], 4, "--expert-model-parallel-size"),
    (["--num-experts", "4", "--expert-model-parallel-size", "3"], 4, "--expert-model-parallel-size"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "0"], 1, "--moe-expert-capacity-factor"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], 2, "--sequence-parallel"),
    (["--num-experts", "4", "--moe-router-enable-expert-bias"], 1, "--moe-router-score-function"),
    (["--num-experts", "4", "--moe-latent-size", "16"], 1, "--moe-latent-size"),
    (["--num-experts", "4", "--moe-token-dispatcher-type", "flex"], 1, "flex"),
])
def test_contradictory_moe_settings_fail_at_parse_time(extra, world, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        moe(extra, world_size=world)


# Document 000's hot/cold and token-distribution blocks and document 001's drop-rate block, as written there
# (001 spells the list `callback:`).
TOOLS_YAML = """
moe_config:
  expert_num: 8
  capacity_factor: 2.0
  use_allgather_dispatcher: false
  enable_cold_hot_expert: True
  hot_expert_num: 1
  cold_token_percent: 0.7
  moe_module_name: "language_model.encoder.layers"
  update_step: 50
  save_token_distribution: true
  callback_moe_droprate: True

callback:
- type: SummaryMonitor
  summary_dir: "../summary_dir/token_distribution_dir"
  keep_default_action: False
  collect_freq: 1
  collect_tensor_freq: 1
  export_options: {'tensor_format':'npy'}
- type: MoEDropRateCallback
  expert_num: 8
  capacity_factor: 2.0
  num_layers: 4
  mtp_depth: 1
"""


def test_documents_moe_tool_settings_land_in_the_configs(tmp_path):
    from mindtron.training.callbacks import build_callbacks

    path = tmp_path / "tools.yaml"
    path.write_text(TOOLS_YAML)
    config = init_configs_from_args(parse_args(args=BASE + ["--yaml-cfg", str(path)], world_size=1))
    m = config.model_config.moe_config
    assert (m.enable_cold_hot_expert, m.hot_expert_num, m.cold_token_percent) == (True, 1, 0.7)
    assert (m.moe_module_name, m.hot_expert_update_step) == ("language_model.encoder.layers", 50)
    assert m.save_token_distribution and m.callback_moe_droprate and m.moe_token_dispatcher_type == "alltoall"
    assert [c["type"] for c in config.training_config.callbacks] == ["SummaryMonitor", "MoEDropRateCallback"]
    built = build_callbacks(config)  # the listed ones, then the hot-expert monitor the options ask for
    assert [type(c).__name__ for c in built] == ["TokenDistributionMonitor", "MoEDropRateCallback",
                                                 "ColdHotExpertMonitor"]
    assert built.callbacks[0].save_dir == "../summary_dir/token_distribution_dir" and built.callbacks[0].interval == 1
    for option in ("--save-token-distribution", "--enable-cold-hot-expert", "--hot-expert-num", "--callbacks",
                   "--token-distribution-dir", "--moe-router-force-biased", "--log-token-distribution"):
        assert P.policy(mf.FLAGS_BY_OPTION[option]).status == P.IMPLEMENTED, option


def test_moe_tool_flags_and_callbacks_on_the_command_line():
    args = parse_args(args=BASE + MIXTRAL[:-1] + [
        "--enable-cold-hot-expert", "--hot-expert-num", "2", "--cold-token-percent", "0.5",
        "--moe-expert-capacity-factor", "1.25", "--hot-expert-update-step", "100", "--save-token-distribution",
        "--token-distribution-dir", "/tmp/td", "--token-distribution-interval", "10", "--log-token-distribution",
        "--moe-router-force-biased", "-2.5", "--callbacks", '[{"type": "MoEDropRateCallback", "mtp_depth": 0}]'],
        world_size=1)
    config = init_configs_from_args(args)
    m, t = config.model_config.moe_config, config.training_config
    assert (m.hot_expert_num, m.cold_token_percent, m.hot_expert_update_step) == (2, 0.5, 100)
    assert m.moe_router_force_biased == -2.5 and m.save_token_distribution
    assert (t.token_distribution_dir, t.token_distribution_interval, t.log_token_distribution) == ("/tmp/td", 10, True)
    assert t.callbacks == [{"type": "MoEDropRateCallback", "mtp_depth": 0}]


@pytest.mark.parametrize("extra,message", [
    (["--save-token-distribution"], "need an MoE model"),
    (["--num-experts", "4", "--enable-cold-hot-expert", "--hot-expert-num", "1"], "alltoall"),
    (["--num-experts", "4", "--moe-token-dispatcher-type", "alltoall", "--enable-cold-hot-expert"], "--hot-expert-num"),
    (["--callbacks", "[{\"expert_num\": 8}]"], "each with a 'type'"),
    (["--callbacks", "not json"], "is not JSON"),
])
def test_moe_tool_settings_fail_at_parse_time(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args(args=BASE + extra, world_size=1)
