"""Issue 14's flags on the command line: every model / optimizer flag lands in its config field with
Megatron's meaning, derived values follow Megatron's validate_args, refused flags are errors naming the flag
and the reason, and flags without an effect are accepted with a warning (flag_policy)."""
import re

import pytest

from mindtron.training import arguments as A
from mindtron.training import flag_policy as P
from mindtron.training.arguments import init_configs_from_args, parse_args

pytestmark = pytest.mark.filterwarnings("ignore::mindtron.training.arguments.NotImplementedFlagWarning")

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    P.reset_warnings()
    monkeypatch.setattr(A, "_GLOBAL_ARGS", None)
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)


def configs(extra=(), world_size=1):
    args = parse_args(args=BASE + list(extra), world_size=world_size)
    return args, init_configs_from_args(args)


# (flags, {"section.field": expected}); the defaults differ from every expected value (checked below)
MAPPED = [
    (["--apply-layernorm-1p"], {"model_config.layernorm_zero_centered_gamma": True}),
    (["--qk-layernorm"], {"model_config.qk_layernorm": True}),
    (["--qk-l2-norm"], {"model_config.qk_l2_norm": True}),
    (["--window-size", "128,0", "--window-attn-skip-freq", "2"],
     {"model_config.window_size": (128, 0), "model_config.window_attn_skip_freq": [1, 0, 1, 0]}),
    (["--window-size", "8,0", "--window-attn-skip-freq", "([1]*3+[0])"],
     {"model_config.window_attn_skip_freq": [1, 1, 1, 0]}),
    (["--softmax-type", "learnable"], {"model_config.softmax_type": "learnable"}),
    (["--attention-output-gate"], {"model_config.attention_output_gate": True}),
    (["--position-embedding-type", "rope", "--rotary-interleaved", "--rotary-seq-len-interpolation-factor", "4",
      "--use-rope-scaling", "--rope-scaling-factor", "32", "--no-rope-freq", "4"],
     {"model_config.rotary_interleaved": True, "model_config.rotary_seq_len_interpolation_factor": 4,
      "model_config.use_rope_scaling": True, "model_config.rope_scaling_factor": 32.0,
      "model_config.no_rope_freq": [0, 0, 0, 1]}),
    (["--position-embedding-type", "yarn", "--rotary-scaling-factor", "32", "--mscale", "0.707",
      "--mscale-all-dim", "0.707", "--yarn-original-max-position-embeddings", "4096", "--yarn-beta-fast", "16",
      "--yarn-beta-slow", "2", "--no-yarn-correction-range-round-to-int"],
     {"model_config.position_embedding_type": "yarn", "model_config.yarn_rotary_scaling_factor": 32.0,
      "model_config.yarn_mscale": 0.707, "model_config.yarn_mscale_all_dim": 0.707,
      "model_config.yarn_beta_fast": 16.0, "model_config.yarn_beta_slow": 2.0,
      "model_config.yarn_correction_range_round_to_int": False}),
    (["--quick-geglu", "--activation-func-clamp-value", "7.0", "--glu-linear-offset", "1.0"],
     {"model_config.hidden_act": "quick_geglu", "model_config.activation_func_clamp_value": 7.0,
      "model_config.glu_linear_offset": 1.0}),
    (["--swiglu", "--no-bias-swiglu-fusion"], {"model_config.bias_swiglu_fusion": False}),
    (["--init-method-xavier-uniform", "--embedding-init-method-std", "1.0"],
     {"model_config.init_method_xavier_uniform": True, "model_config.embedding_init_method_std": 1.0}),
    (["--calculate-per-token-loss"], {"model_config.calculate_per_token_loss": True}),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
      "--decoder-last-pipeline-num-layers", "3"],
     {"model_config.num_layers_in_first_pipeline_stage": 1, "model_config.num_layers_in_last_pipeline_stage": 3}),
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split"],
     {"model_config.account_for_embedding_in_pipeline_split": True,
      "model_config.account_for_loss_in_pipeline_split": True}),
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|t|tt|L"],
     {"model_config.pipeline_model_parallel_layout": "Et|t|tt|L",
      "parallel_config.virtual_pipeline_model_parallel_size": 2}),
    (["--decoupled-lr", "1e-4", "--decoupled-min-lr", "1e-5"],
     {"optimizer_config.decoupled_lr": 1e-4, "optimizer_config.decoupled_min_lr": 1e-5}),
    (["--apply-wd-to-qk-layernorm"], {"optimizer_config.apply_wd_to_qk_layernorm": True}),
    (["--no-weight-decay-cond-type", "apply_wd_to_qk_layernorm"], {"optimizer_config.apply_wd_to_qk_layernorm": True}),
    (["--iterations-to-skip", "3", "5"], {"training_config.iterations_to_skip": [3, 5]}),
]


def value_at(cfg, target):
    section, field = target.split(".")
    return getattr(getattr(cfg, section), field)


@pytest.mark.parametrize("flags, expected", MAPPED, ids=[" ".join(f[:1]) for f, _ in MAPPED])
def test_flags_land_in_their_config_fields(flags, expected):
    world = 2 if "--pipeline-model-parallel-size" in flags else 1
    _, cfg = configs(flags, world_size=world)
    _, default = configs(["--pipeline-model-parallel-size", "2"] if world == 2 else [], world_size=world)
    for target, value in expected.items():
        assert value_at(cfg, target) == value, target
        assert value_at(default, target) != value, f"{target}: the default already has the tested value"


def test_every_issue14_row_is_tested_and_yarn_defaults_are_megatrons():
    dests = [d for d, _ in A.CONFIG_MAP]
    rows = A.CONFIG_MAP[dests.index("layernorm_zero_centered_gamma"):dests.index("num_experts")]
    tested = {t for _, expected in MAPPED for t in expected}
    untested = [(d, t) for d, t in rows if t not in tested]
    assert ("iterations_to_skip", "training_config.iterations_to_skip") in A.CONFIG_MAP
    assert untested == [("yarn_original_max_position_embeddings", "model_config.yarn_original_max_position_embeddings")]
    _, cfg = configs(["--position-embedding-type", "yarn"])
    m = cfg.model_config
    assert (m.yarn_original_max_position_embeddings, m.yarn_beta_fast, m.yarn_beta_slow,
            m.yarn_correction_range_round_to_int, m.yarn_rotary_scaling_factor) == (4096, 32.0, 1.0, True, 1.0)
    _, cfg = configs(["--position-embedding-type", "yarn", "--yarn-original-max-position-embeddings", "8192"])
    assert cfg.model_config.yarn_original_max_position_embeddings == 8192


def test_layout_sets_the_virtual_stages_and_is_checked():
    args, _ = configs(["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Ett|ttL"],
                      world_size=2)
    assert args.virtual_pipeline_model_parallel_size is None
    with pytest.raises(ValueError, match="has 3 stages, which --pipeline-model-parallel-size 2 does not divide"):
        configs(["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|t|ttL"], world_size=2)
    with pytest.raises(ValueError, match="no more than one of"):
        configs(["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Ett|ttL",
                 "--num-layers-per-virtual-pipeline-stage", "1"], world_size=2)


REFUSED = [
    (["--fp8-format", "hybrid"], "--fp8-format hybrid: low-precision (FP8/FP4/MXFP8)"),
    (["--fp4-format", "e2m1"], "--fp4-format e2m1"),
    (["--multi-latent-attention"], "--multi-latent-attention (set): multi-latent attention is not implemented"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers 1: multi-token prediction"),
    (["--position-embedding-type", "mrope"], "--position-embedding-type mrope is not available"),
    (["--is-hybrid-model"], "Mamba / hybrid"),
    (["--hybrid-override-pattern", "M*-"], "Mamba / hybrid"),
    (["--spec", "my.module", "my_spec"], "--spec my.module my_spec"),
    (["--heterogeneous-layers-config-path", "x.json"], "--heterogeneous-layers-config-path x.json"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 (set): mindtron accumulates and reduces gradients in fp32"),
    (["--use-precision-aware-optimizer"], "--use-precision-aware-optimizer (set)"),
    (["--main-grads-dtype", "bf16"], "--main-grads-dtype bf16"),
    (["--exp-avg-sq-dtype", "fp16"], "--exp-avg-sq-dtype fp16"),
    (["--data-parallel-random-init"], "--data-parallel-random-init with dropout"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[f[0] for f, _ in REFUSED])
def test_refused_flags_are_errors_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        configs(flags)


def test_accepted_forms_of_refusable_flags():
    """Values that change nothing pass: fp32 optimizer dtypes, --rope-type (Megatron reads it only with the
    refused multi-latent attention), --data-parallel-random-init without dropout (the weights are the same on
    every rank anyway)."""
    configs(["--main-grads-dtype", "fp32", "--exp-avg-dtype", "fp32", "--rope-type", "yarn"])
    args, _ = configs(["--data-parallel-random-init", "--hidden-dropout", "0", "--attention-dropout", "0",
                       "--use-cpu-initialization"])
    assert args.data_parallel_random_init


def test_flags_without_an_effect_here_are_accepted_with_a_warning():
    """Flags that change nothing in mindtron's maths warn once (NOT_IMPLEMENTED), they are not refused."""
    for kept in ("--apply-residual-connection-post-layernorm", "--te-rng-tracker", "--attention-backend",
                 "--decoder-num-layers", "--rope-type", "--relative-attention-num-buckets"):
        assert kept in A.NOT_IMPLEMENTED and kept not in P.REFUSED_FLAGS, kept


def test_quick_geglu_keeps_the_4h_ffn_default():
    """Megatron's 2/3 ffn rule belongs to --swiglu; --quick-geglu keeps 4 x hidden."""
    assert configs(["--quick-geglu"])[1].model_config.ffn_hidden_size == 256
    assert configs(["--swiglu"])[1].model_config.ffn_hidden_size == 128


def test_option_conflicts_name_the_flags():
    with pytest.raises(ValueError, match="--quick-geglu excludes --swiglu"):
        configs(["--quick-geglu", "--swiglu"])
    with pytest.raises(ValueError, match="--glu-linear-offset with --swiglu needs --no-bias-swiglu-fusion"):
        configs(["--swiglu", "--glu-linear-offset", "1.0"])
    with pytest.warns(P.NotImplementedFlagWarning, match="--no-bias-swiglu-fusion to clamp"):
        configs(["--swiglu", "--activation-func-clamp-value", "7.0"])
