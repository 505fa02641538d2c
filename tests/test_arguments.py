"""Megatron's argument layer: flag table, parsing, YAML, validation and the mapping onto the five configs.

Single process and fast: no device, no process group (the world size is passed in or set in the env).
"""
import csv
import dataclasses
import json
import os
import sys
import warnings

import pytest

from mindtron.training import arguments as A
from mindtron.training import flag_policy as P
from mindtron.training import megatron_flags as mf
from mindtron.training import yaml_arguments as Y
from mindtron.training.arguments import (NOT_IMPLEMENTED, NotImplementedFlagWarning, get_args, init_configs_from_args,
                                         load_yaml_config, parse_args, set_args)
from mindtron.training.config import DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig
from mindtron.legacy_model.config import ACTIVATIONS, NORMALIZATIONS, TransformerConfig

# Flags the tests set on purpose warn as not implemented; the tests that check warnings record them.
pytestmark = pytest.mark.filterwarnings("ignore::mindtron.training.arguments.NotImplementedFlagWarning")

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--train-iters", "10"]

# Megatron-LM core_r0.19.0's examples/gpt3/train_gpt3_175b_distributed.sh, flag for flag (the schedule's
# quoted value is one argument).
GPT3_175B = """
    --num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048
    --attention-backend auto
    --micro-batch-size 1 --global-batch-size 1536 STEP_SCHEDULE --train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9
    --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine
    --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
    --data-path /data/gpt_text_document --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --split 949,50,1
    --log-interval 100 --save-interval 10000 --eval-interval 1000 --save /ckpt --load /ckpt --eval-iters 10
    --tensorboard-dir /tb
""".split()
_AT = GPT3_175B.index("STEP_SCHEDULE")
GPT3_175B[_AT:_AT + 1] = ["--step-batch-size-schedule", "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"]

LLAMA = """
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --seq-length 4096 --max-position-embeddings 4096
    --swiglu --normalization RMSNorm --position-embedding-type rope --rotary-base 500000
    --group-query-attention --num-query-groups 8 --untie-embeddings-and-output-weights --disable-bias-linear
    --attention-dropout 0.0 --hidden-dropout 0.0 --norm-epsilon 1e-5 --bf16 --use-flash-attn
    --micro-batch-size 1 --global-batch-size 128 --train-iters 1000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 100
    --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 2
    --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce
    --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --vocab-size 32000 --mock-data
""".split()


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """Each test starts with no global args, no warning memory and a one-process world."""
    monkeypatch.setattr(P, "_WARNED", set())
    monkeypatch.setattr(A, "_GLOBAL_ARGS", None)
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)


def configs(extra=(), world_size=8, base=BASE):
    """Parse BASE + extra (later flags win) and build the five configs."""
    args = parse_args(args=list(base) + list(extra), world_size=world_size)
    return args, init_configs_from_args(args)


def field_value(all_config, target):
    """all_config's value at "section.field[.key]"."""
    section, field, *key = target.split(".")
    value = getattr(getattr(all_config, section), field)
    return value[key[0]] if key else value


# -------------------------------------------------------------------------------------------------------
# The flag table
# -------------------------------------------------------------------------------------------------------
def _table_rows():
    """The rows of the shipped copy of Megatron-LM core_r0.19.0's flag table, read independently."""
    with open(mf.TABLE_PATH, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _json_or_text(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Where mindtron deliberately differs from a row of Megatron's table, with the reason. Nothing else may differ.
DELIBERATE_DIFFERENCES = {
    "--yaml-cfg": "extra alias --config: document 002 passes its YAML file with --config",
    "--ckpt-format": "extra choice safetensors: mindtron's own checkpoint format",
}
# Defaults Megatron computes from the environment when its parser is built (the table holds the value with
# the variable unset).
ENV_DEFAULTS = {"--local-rank": "LOCAL_RANK", "--inprocess-active-world-size": "WORLD_SIZE"}
# Options sharing a dest: Megatron registers this one first (arguments.py), so argparse keeps its default.
SHARED_DEST = {"yarn_correction_range_round_to_int": "--yarn-correction-range-round-to-int"}
# Text that each of Megatron's own converters accepts, and what it must give.
CUSTOM_TYPES = {
    "tuple_type": [("1,2", (1, 2)), ("(3,4)", (3, 4))],
    "moe_freq_type": [("4", 4), ("([1]*2+[0])*2", [1, 1, 0, 1, 1, 0])],
    "la_freq_type": [("3", 3), ("[0]+[1]*2", [0, 1, 1])],
    "no_rope_freq_type": [("4", 4), ("([0]*3+[1])", [0, 0, 0, 1])],
    "bool": [("x", True)],
}


def _expected_default(row):
    if row["type"] == "enum_type_handler":
        return row["default"]  # compared by repr (AttnBackend) or value (signal number)
    value = _json_or_text(row["default"])
    if row["type"] == "str" and value is not None and not isinstance(value, (str, list)):
        return row["default"]
    return value


def test_every_row_of_megatrons_flag_table_parses_with_its_dest_type_default_nargs_and_choices():
    rows = _table_rows()
    assert len(rows) == 807 and len({r["flag"] for r in rows}) == 807
    parser = mf.build_parser(A.MegatronArgumentParser)
    actions = {o: a for a in parser._actions for o in a.option_strings}
    defaults = vars(parser.parse_args([]))
    assert set(mf.MINDTRON_CHANGES) == set(DELIBERATE_DIFFERENCES)
    problems = []
    for row in rows:
        name, dest, kind = row["flag"], row["dest"], row["type"]
        aliases = [o for o in row["aliases"].split(",") if o]
        options = [name] + aliases
        missing = [o for o in options if o not in actions]
        if missing:
            problems.append((name, "options not accepted", missing))
            continue
        action = actions[name]
        if action.dest != dest or any(actions[o].dest != dest for o in aliases):
            problems.append((name, "dest", action.dest, dest))
        # default (what Megatron's parser leaves when the flag is not given)
        got = defaults[dest]
        if dest in SHARED_DEST and name != SHARED_DEST[dest]:
            want = _expected_default(next(r for r in rows if r["flag"] == SHARED_DEST[dest]))
        elif name in ENV_DEFAULTS:
            want = int(os.environ.get(ENV_DEFAULTS[name], row["default"]))
        else:
            want = _expected_default(row)
        if kind == "enum_type_handler":
            ok = repr(got) == want if dest == "attention_backend" else got == int(want)
        else:
            ok = got == want and type(got) is type(want)
        if not ok:
            problems.append((name, "default", got, want))
        # nargs and type, by what the option does on a command line
        nargs = _json_or_text(row["nargs"])
        if kind in ("store_true", "store_false"):
            value = getattr(parser.parse_args([name]), dest)
            if value is not (kind == "store_true"):
                problems.append((name, kind, value))
            continue
        if nargs == 0:  # BooleanOptionalAction: --x and --no-x
            positive = [o for o in options if not o.startswith("--no-")]
            negative = [o for o in options if o.startswith("--no-")]
            if not negative or getattr(parser.parse_args([positive[0]]), dest) is not True or \
                    getattr(parser.parse_args([negative[0]]), dest) is not False:
                problems.append((name, "boolean optional", options))
            continue
        if action.nargs != nargs:
            problems.append((name, "nargs", action.nargs, nargs))
        choices = _json_or_text(row["choices"])
        if kind in ("int", "float", "str"):
            if action.type is not {"int": int, "float": float, "str": str}[kind]:
                problems.append((name, "type", action.type, kind))
        elif kind == "enum_type_handler":
            member = "flash" if dest == "attention_backend" else "SIGINT"
            parsed = getattr(parser.parse_args([name, member]), dest)
            if repr(parsed) not in ("<AttnBackend.flash: 1>", "<Signals.SIGINT: 2>"):
                problems.append((name, "enum", parsed))
            listed = [repr(c) for c in action.choices] if dest == "attention_backend" else \
                sorted(int(c) for c in action.choices)
            want_choices = [c.strip() for c in row["choices"].strip("[]").split(",")] \
                if dest == "attention_backend" else sorted(choices)
            if listed != want_choices:
                problems.append((name, "choices", listed, want_choices))
            continue
        elif kind == "_parse_cuda_graph_modules_arg":
            parsed = getattr(parser.parse_args([name, "attn", "full"]), dest)
            if [repr(parsed[0]), parsed[1]] != ["<CudaGraphModule.attn: 1>", "full"]:
                problems.append((name, "cuda graph modules", parsed))
        else:
            for text, value in CUSTOM_TYPES[kind]:
                parsed = getattr(parser.parse_args([name, text]), dest)
                if parsed != value:
                    problems.append((name, kind, text, parsed, value))
        if choices is not None and name not in DELIBERATE_DIFFERENCES:
            if list(action.choices) != choices:
                problems.append((name, "choices", action.choices, choices))
        # every option string (aliases too) takes a value and lands in the dest
        sample = next((str(c) for c in choices if c != defaults[dest]), None) if choices else \
            {"int": "3" if defaults[dest] != 3 else "4", "float": "0.5" if defaults[dest] != 0.5 else "0.25"
             }.get(kind, "a")
        if kind in CUSTOM_TYPES:
            sample = CUSTOM_TYPES[kind][0][0]
        elif kind == "_parse_cuda_graph_modules_arg":
            sample = "attn"
        tokens = [sample] * (nargs if isinstance(nargs, int) else 1)
        for option in options:
            if getattr(parser.parse_args([option] + tokens), dest) == defaults[dest]:
                problems.append((name, "option gives the default", option))
    assert not problems, problems[:20]


def test_deliberate_differences_are_the_documented_ones():
    by = mf.FLAGS_BY_OPTION
    assert by["--config"] is by["--yaml-cfg"]
    assert "safetensors" in by["--ckpt-format"].choices
    assert by["--ckpt-format"].default == "torch_dist"
    for reason in DELIBERATE_DIFFERENCES.values():
        assert reason
    # mindtron's own options (document 002) keep their names and reuse no Megatron dest
    assert all(not f.megatron for title in mf.MINDTRON_GROUPS for f in mf.GROUPS[title])
    assert by["--hidden-act"].choices == ACTIVATIONS and by["--normalization"].choices == NORMALIZATIONS


def test_megatron_019_dests_and_defaults_that_differ_from_older_tables():
    parsed = mf.build_parser().parse_args(["--apply-layernorm-1p", "--norm-epsilon", "1e-6",
                                           "--disable-gloo-process-groups", "--tokenizer-metadata", "m.json",
                                           "--tokenizer-special-tokens", "<a>", "<b>"])
    assert parsed.layernorm_zero_centered_gamma and parsed.layernorm_epsilon == 1e-6
    assert parsed.use_gloo_process_groups is False and parsed.metadata_path == "m.json"
    assert parsed.special_tokens == ["<a>", "<b>"]
    defaults = mf.build_parser().parse_args([])
    assert defaults.async_save is False and defaults.eval_interval is None
    assert defaults.data_parallel_sharding_strategy == "optim_grads_params"
    assert defaults.rampup_batch_size is None and mf.FLAGS_BY_OPTION["--rampup-batch-size"].nargs == 3
    with pytest.raises(SystemExit):
        mf.build_parser().parse_args(["--rampup-batch-size", "16", "16"])  # three numbers, as in 0.19


# -------------------------------------------------------------------------------------------------------
# The flag policy: implemented / accepted and ignored / refused, with a reason per flag
# -------------------------------------------------------------------------------------------------------
def test_every_flag_has_a_policy_with_a_reason():
    implemented = {d for d, _ in A.CONFIG_MAP} | set(A.ARGUMENT_LAYER)
    counts = {P.IMPLEMENTED: 0, P.IGNORED: 0, P.REFUSED: 0}
    for option, group, status, reason in P.policy_table():
        flag = mf.FLAGS_BY_OPTION[option]
        assert status in counts and reason, option
        counts[status] += 1
        assert (status == P.IMPLEMENTED) == (flag.dest in implemented), (option, status)
        assert (option in NOT_IMPLEMENTED) == (status == P.IGNORED)
        assert (option in A.REFUSED_FLAGS) == (status == P.REFUSED)
    assert sum(counts.values()) == len(mf.ALL_FLAGS) and all(counts.values())
    for dest, target in A.CONFIG_MAP:
        assert dest in mf.FLAGS_BY_DEST, dest
    for dest in A.ARGUMENT_LAYER:
        assert dest in mf.FLAGS_BY_DEST, dest
    # a few decisions the README states
    status = {o: s for o, _, s, _ in P.policy_table()}
    assert status["--fp8-format"] == status["--mamba-state-dim"] == status["--multi-latent-attention"] == P.REFUSED
    assert status["--apply-layernorm-1p"] == status["--window-size"] == status["--decoupled-lr"] == P.IMPLEMENTED
    assert status["--tp-comm-overlap"] == status["--cuda-graph-impl"] == status["--moe-permute-fusion"] == P.IGNORED
    assert status["--num-experts"] == status["--moe-grouped-gemm"] == P.IMPLEMENTED
    assert status["--moe-latent-size"] == status["--moe-use-upcycling"] == P.REFUSED
    assert status["--step-batch-size-schedule"] == status["--rampup-batch-size"] == P.IMPLEMENTED
    assert status["--null-tokenizer-eod-id"] == status["--tensorboard-dir"] == P.IMPLEMENTED
    assert status["--use-pytorch-profiler"] == P.IGNORED


def test_refused_flags_raise_naming_the_flag_only_when_set_to_a_non_default_value():
    with pytest.raises(ValueError, match=r"--fp8-format hybrid: low-precision .*Transformer Engine"):
        configs(["--fp8-format", "hybrid"])
    with pytest.raises(ValueError, match=r"--multi-latent-attention \(set\): multi-latent attention is not"):
        configs(["--multi-latent-attention"])
    with pytest.raises(ValueError, match="--mamba-num-heads 4: Mamba"):
        configs(["--mamba-num-heads", "4"])
    configs(["--fp8-margin", "0", "--mamba-state-dim", "128"])  # Megatron's defaults: accepted silently


def test_every_flag_is_accepted_by_the_parser():
    parser = mf.build_parser(A.MegatronArgumentParser)
    for flag in mf.ALL_FLAGS:
        for option in flag.options:
            if flag.action in ("store_true", "store_false", "bool_optional"):
                tokens = [option]
            elif flag.choices is not None:
                tokens = [option, next(getattr(c, "name", str(c)) for c in flag.choices if c is not None)]
            else:
                value = {int: "3", float: "0.5", mf.layer_freq: "2", mf.int_tuple: "1,2", mf.layer_list: "1,1",
                         mf.cp_algo: "ulysses", mf.str_to_bool: "false", mf.truthy_text: "1",
                         mf.cuda_graph_module: "attn", mf.callback_list: '[{"type": "X"}]'}.get(flag.type, "x")
                tokens = [option] + [value] * (flag.nargs if isinstance(flag.nargs, int) else 1)
            parsed = parser.parse_args(tokens)
            assert hasattr(parsed, flag.dest), option


# -------------------------------------------------------------------------------------------------------
# Megatron's example scripts
# -------------------------------------------------------------------------------------------------------
def test_gpt3_175b_flags_parse_and_map():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = parse_args(args=GPT3_175B, world_size=1024)
    assert [str(w.message) for w in caught] == []  # every flag of the script is implemented
    assert args.data_parallel_size == 8 and args.global_batch_size == 1536
    assert args.gradient_accumulation_steps == 16 // (1 * 8)  # the first iteration's, by the schedule
    assert args.params_dtype == "float16" and args.ffn_hidden_size == 4 * 12288 and args.kv_channels == 128
    cfg = init_configs_from_args(args)
    assert cfg.training_config.tensorboard_dir == "/tb"
    m, t, o, p, d = (cfg.model_config, cfg.training_config, cfg.optimizer_config, cfg.parallel_config,
                     cfg.dataset_config)
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (96, 12288, 96, 2048)
    assert m.vocab_size == 51200  # GPT-2's 50257 padded to a multiple of 128 x tp 8
    assert m.init_method_std == 0.006 and m.params_dtype == "float16" and m.hidden_act == "gelu"
    assert (t.training_iters, t.micro_batch_size, t.global_batch_size, t.fp16) == (500000, 1, 1536, True)
    assert t.gradient_accumulation_steps == 2 and d.micro_batch_num == 2 and d.batch_size == 1
    assert t.step_batch_size_schedule == "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"
    assert (t.use_clip_grad, t.max_grad_norm, o.clip_grad) == (True, 1.0, 1.0)
    assert (t.save_interval, t.eval_interval, t.eval_iters, t.log_interval) == (10000, 1000, 10, 100)
    assert (t.output_dir, t.load_checkpoint) == ("/ckpt", "/ckpt")
    assert (o.learning_rate, o.min_lr, o.lr_decay_style, o.lr_decay_iters) == (6.0e-5, 6.0e-6, "cosine", 430000)
    assert (o.lr_warmup_fraction, o.lr_warmup_iters) == (0.001, 0)
    assert o.betas == (0.9, 0.95) and o.weight_decay == 0.1 == o.start_weight_decay == o.end_weight_decay
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (8, 16)
    assert d.data_path == ["/data/gpt_text_document"] and d.split == "949,50,1"
    assert (d.vocab_file, d.merge_file) == ("gpt2-vocab.json", "gpt2-merges.txt")


def test_rampup_needs_sample_based_training():
    # Megatron-Core 0.15's rule for the ramp-up (0.19 ignores the flag; mindtron keeps 0.15's meaning)
    older = [a for a in GPT3_175B if not a.startswith(("--step-batch", "0:16"))]
    with pytest.raises(ValueError, match="--rampup-batch-size needs sample-based training"):
        parse_args(args=older + ["--rampup-batch-size", "16", "16", "5859375"], world_size=1024)
    with pytest.raises(ValueError, match="--rampup-batch-size and --step-batch-size-schedule exclude each other"):
        parse_args(args=GPT3_175B + ["--rampup-batch-size", "16", "16", "5859375"], world_size=1024)
    with pytest.raises(ValueError, match=r"--global-batch-size 1024 differs from the last batch size of "
                                         r"--step-batch-size-schedule \(1536\)"):
        parse_args(args=GPT3_175B + ["--global-batch-size", "1024"], world_size=1024)


def test_llama_style_flags_parse_and_map():
    args = parse_args(args=LLAMA, world_size=64)
    assert args.data_parallel_size == 8 and args.virtual_pipeline_model_parallel_size == 32 // 4 // 2
    assert args.accumulate_allreduce_grads_in_fp32  # Megatron's bf16 rule
    cfg = init_configs_from_args(args)
    m, p = cfg.model_config, cfg.parallel_config
    assert m.hidden_act == "swiglu" and m.ffn_hidden_size == int((4 * 4096 * 2 / 3) / 64) * 64 == 10880
    assert (m.normalization, m.position_embedding_type, m.rotary_base) == ("RMSNorm", "rope", 500000.0)
    assert m.group_query_attention and m.num_query_groups == 8 and m.kv_channels == 128
    assert m.untie_embeddings_and_output_weights
    assert (m.add_bias_linear, m.qkv_has_bias, m.out_proj_has_bias, m.bias_gelu_fusion) == (False,) * 4
    assert (m.params_dtype, m.compute_dtype, m.embedding_init_dtype) == ("bfloat16",) * 3
    assert m.use_flash_attention and m.apply_rope_fusion and m.sequence_parallel
    assert m.vocab_size == 32000 and cfg.dataset_config.vocab_size == 32000
    assert (m.attention_dropout_rate, m.hidden_dropout_rate) == (0.0, 0.0)
    assert (p.virtual_pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage) == (4, 2)
    assert p.sequence_parallel and cfg.training_config.use_distributed_optimizer
    assert cfg.training_config.overlap_grad_reduce and cfg.training_config.bf16
    assert cfg.training_config.accumulate_allreduce_grads_in_fp32


# -------------------------------------------------------------------------------------------------------
# Document 002's five mapping tables (Megatron name -> config field), walked one row at a time
# -------------------------------------------------------------------------------------------------------
_RC = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]
_WD = ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.02", "--end-weight-decay", "0.2"]
DOC002_TABLES = [
    # model_config
    ("padded_vocab_size", "model_config.vocab_size", ["--padded-vocab-size", "1024"], 1024),
    ("hidden_size", "model_config.hidden_size", ["--hidden-size", "96"], 96),
    ("seq_length", "model_config.seq_length", ["--seq-length", "48"], 48),
    ("rotary_base", "model_config.rotary_base", ["--rotary-base", "500000"], 500000.0),
    ("num_layers", "model_config.num_layers", ["--num-layers", "4"], 4),
    ("position_embedding_type", "model_config.position_embedding_type", ["--position-embedding-type", "rope"],
     "rope"),
    ("use_rotary_position_embeddings", "model_config.use_rotary_embedding", ["--use-rotary-position-embeddings"],
     True),
    ("init_method_std", "model_config.init_method_std", ["--init-method-std", "0.006"], 0.006),
    ("normalization", "model_config.normalization", ["--normalization", "RMSNorm"], "RMSNorm"),
    ("layernorm_epsilon", "model_config.norm_epsilon", ["--norm-epsilon", "1e-6"], 1e-6),
    ("group_query_attention", "model_config.group_query_attention",
     ["--group-query-attention", "--num-query-groups", "2"], True),
    ("num_attention_heads", "model_config.num_attention_heads", ["--num-attention-heads", "8"], 8),
    ("num_query_groups", "model_config.num_query_groups", ["--group-query-attention", "--num-query-groups", "2"], 2),
    ("attention_dropout", "model_config.attention_dropout_rate", ["--attention-dropout", "0.25"], 0.25),
    ("ffn_hidden_size", "model_config.ffn_hidden_size", ["--ffn-hidden-size", "96"], 96),
    ("hidden_dropout", "model_config.hidden_dropout_rate", ["--hidden-dropout", "0.25"], 0.25),
    ("attention_softmax_in_fp32", "model_config.attention_softmax_in_fp32", ["--attention-softmax-in-fp32"], True),
    ("use_flash_attn", "model_config.use_flash_attention", ["--use-flash-attn"], True),
    ("untie_embeddings_and_output_weights", "model_config.untie_embeddings_and_output_weights",
     ["--untie-embeddings-and-output-weights"], True),
    ("transformer_impl", "model_config.transformer_impl", ["--transformer-impl", "local"], "local"),
    ("enable_cuda_graph", "model_config.jit_layers", ["--enable-cuda-graph"], True),
    ("no_jit_layers", "model_config.jit_layers", ["--no-jit-layers"], False),
    ("recompute_granularity", "model_config.recompute_granularity", ["--recompute-granularity", "selective"],
     "selective"),
    ("recompute_method", "model_config.recompute_method", _RC, "block"),
    ("recompute_num_layers", "model_config.recompute_num_layers", _RC, 1),
    ("fp16_lm_cross_entropy", "model_config.fp16_lm_cross_entropy", ["--fp16", "--fp16-lm-cross-entropy"], True),
    ("fp32_residual_connection", "model_config.fp32_residual_connection", ["--fp16", "--fp32-residual-connection"],
     True),
    ("add_qkv_bias", "model_config.qkv_has_bias", ["--disable-bias-linear", "--add-qkv-bias"], True),
    ("add_dense_bias", "model_config.out_proj_has_bias", ["--disable-bias-linear", "--add-dense-bias"], True),
    ("add_bias_linear", "model_config.add_bias_linear", ["--disable-bias-linear"], False),
    ("use_sandwich_norm", "model_config.use_sandwich_norm", ["--use-sandwich-norm"], True),
    ("pre_tockens", "model_config.fa_config.pre_tokens", ["--pre-tockens", "1024"], 1024),
    ("next_tockens", "model_config.fa_config.next_tokens", ["--next-tockens", "4"], 4),
    ("shape_order", "model_config.fa_config.input_layout", ["--shape-order", "BSH"], "BSH"),
    ("attn_post_norm_scale", "model_config.attn_post_norm_scale", ["--attn-post-norm-scale", "0.0447"], 0.0447),
    ("ffn_post_norm_scale", "model_config.ffn_post_norm_scale", ["--ffn-post-norm-scale", "0.0825"], 0.0825),
    ("params_dtype", "model_config.params_dtype", ["--params-dtype", "bf16"], "bfloat16"),
    ("compute_dtype", "model_config.compute_dtype", ["--compute-dtype", "float16"], "float16"),
    ("embedding_dtype", "model_config.embedding_init_dtype", ["--embedding-dtype", "float16"], "float16"),
    ("use_fused_swiglu", "model_config.apply_swiglu_fusion", ["--use-fused-swiglu"], True),
    ("apply_rope_fusion", "model_config.apply_rope_fusion", ["--position-embedding-type", "rope", "--no-rope-fusion"],
     False),
    ("hidden_act", "model_config.hidden_act", ["--hidden-act", "silu"], "silu"),
    # training_config
    ("seed", "training_config.seed", ["--seed", "7"], 7),
    ("log_interval", "training_config.log_interval", ["--log-interval", "7"], 7),
    ("train_iters", "training_config.training_iters", ["--train-iters", "7"], 7),
    ("save_interval", "training_config.save_interval", ["--save-interval", "7"], 7),
    ("eval_interval", "training_config.eval_interval", ["--eval-interval", "7"], 7),
    ("accumulate_allreduce_grads_in_fp32", "training_config.accumulate_allreduce_grads_in_fp32",
     ["--accumulate-allreduce-grads-in-fp32"], True),
    ("clip_grad", "optimizer_config.clip_grad", ["--clip-grad", "0.5"], 0.5),
    ("bf16", "training_config.bf16", ["--bf16"], True),
    ("fp16", "training_config.fp16", ["--fp16"], True),
    ("loss_scale", "training_config.loss_scale", ["--loss-scale", "512"], 512.0),
    ("initial_loss_scale", "training_config.loss_scale_value", ["--initial-loss-scale", "65536"], 65536.0),
    ("loss_scale_window", "training_config.loss_scale_window", ["--loss-scale-window", "500"], 500),
    ("hysteresis", "training_config.loss_scale_factor", ["--hysteresis", "4"], 4),
    ("use_distributed_optimizer", "training_config.use_distributed_optimizer", ["--use-distributed-optimizer"], True),
    ("resume_training", "training_config.resume_training", ["--resume-training"], True),
    ("resume_crc_check", "training_config.crc_check", ["--resume-crc-check"], True),
    ("load", "training_config.load_checkpoint", ["--load", "/ckpt/in"], "/ckpt/in"),
    ("save", "training_config.output_dir", ["--save", "/ckpt/out", "--save-interval", "5"], "/ckpt/out"),
    ("ckpt_prefix", "training_config.prefix", ["--ckpt-prefix", "gpt"], "gpt"),
    ("ckpt_format", "training_config.ckpt_format", ["--ckpt-format", "safetensors"], "safetensors"),
    ("keep_checkpoint_max", "training_config.keep_checkpoint_max", ["--keep-checkpoint-max", "3"], 3),
    ("wrap_with_ddp", "training_config.wrap_with_ddp", ["--wrap-with-ddp", "false"], False),
    ("bucket_size", "training_config.bucket_size", ["--bucket-size", "4000"], 4000),
    ("enable_mem_align", "training_config.enable_mem_align", ["--enable-mem-align"], True),
    ("overlap_grad_reduce", "training_config.overlap_grad_reduce", ["--overlap-grad-reduce"], True),
    ("delay_grad_reduce", "training_config.delay_grad_reduce", ["--delay-grad-reduce", "false"], False),
    ("no_load_optim", "training_config.no_load_optim", ["--no-load-optim"], True),
    ("no_load_rng", "training_config.no_load_rng", ["--no-load-rng"], True),
    ("new_dataset", "training_config.new_dataset", ["--new-dataset"], True),
    ("profile", "training_config.profile", ["--profile"], True),
    ("profile_save_path", "training_config.profile_save_path", ["--profile-save-path", "/prof"], "/prof"),
    ("profile_step_start", "training_config.profile_step_start", ["--profile-step-start", "3"], 3),
    ("profile_step_end", "training_config.profile_step_end", ["--profile-step-end", "4"], 4),
    ("profile_level", "training_config.profile_level", ["--profile-level", "level1"], "level1"),
    ("profile_with_stack", "training_config.profile_with_stack", ["--profile-with-stack"], True),
    ("profile_memory", "training_config.profile_memory", ["--profile-memory"], True),
    ("profile_framework", "training_config.profile_framework", ["--profile-framework", "all"], "all"),
    ("profile_communication", "training_config.profile_communication", ["--profile-communication"], True),
    ("profile_parallel_strategy", "training_config.profile_parallel_strategy", ["--profile-parallel-strategy"],
     True),
    ("profile_aicore_metrics", "training_config.profile_aicore_metrics", ["--profile-aicore-metrics", "3"], 3),
    ("profile_l2_cache", "training_config.profile_l2_cache", ["--profile-l2-cache"], True),
    ("profile_hbm_ddr", "training_config.profile_hbm_ddr", ["--profile-hbm-ddr"], True),
    ("profile_pcie", "training_config.profile_pcie", ["--profile-pcie"], True),
    ("profile_data_process", "training_config.profile_data_process", ["--profile-data-process"], True),
    ("profile_data_simplification", "training_config.profile_data_simplification",
     ["--profile-data-simplification"], True),
    ("profile_op_time", "training_config.profile_op_time", ["--profile-op-time", "false"], False),
    ("profile_offline_analyse", "training_config.profile_offline_analyse", ["--profile-offline-analyse"], True),
    ("profile_dynamic_profiler_config_path", "training_config.profile_dynamic_profiler_config_path",
     ["--profile-dynamic-profiler-config-path", "/cfg.json"], "/cfg.json"),
    # dataset_config
    ("reset_attention_mask", "dataset_config.reset_attention_mask", ["--reset-attention-mask"], True),
    ("reset_position_ids", "dataset_config.reset_position_ids", ["--reset-position-ids"], True),
    ("eod_mask_loss", "dataset_config.eod_mask_loss", ["--eod-mask-loss"], True),
    ("pad_token_id", "dataset_config.pad_token_id", ["--pad-token-id", "3"], 3),
    ("eos_token_id", "dataset_config.eos_token_id", ["--eos-token-id", "2"], 2),
    ("drop_remainder", "dataset_config.drop_remainder", ["--drop-remainder", "false"], False),
    ("micro_batch_size", "dataset_config.batch_size", ["--micro-batch-size", "4"], 4),
    ("micro_batch_num", "dataset_config.micro_batch_num", ["--micro-batch-num", "3"], 3),
    # optimizer_config
    ("optimizer", "optimizer_config.optimizer_type", ["--optimizer", "sgd"], "sgd"),
    ("adam_beta1", "optimizer_config.betas", ["--adam-beta1", "0.8"], (0.8, 0.999)),
    ("adam_beta2", "optimizer_config.betas", ["--adam-beta2", "0.95"], (0.9, 0.95)),
    ("adam_eps", "optimizer_config.eps", ["--adam-eps", "1e-6"], 1e-6),
    ("lr_decay_style", "optimizer_config.lr_decay_style", ["--lr-decay-style", "cosine"], "cosine"),
    ("lr", "optimizer_config.learning_rate", ["--lr", "0.003"], 0.003),
    ("min_lr", "optimizer_config.min_lr", ["--min-lr", "0.0001"], 0.0001),
    ("lr_warmup_iters", "optimizer_config.lr_warmup_iters", ["--lr-warmup-iters", "3"], 3),
    ("lr_decay_iters", "optimizer_config.lr_decay_iters", ["--lr-decay-iters", "8"], 8),
    ("use_checkpoint_opt_param_scheduler", "optimizer_config.use_checkpoint_opt_param_scheduler",
     ["--use-checkpoint-opt_param-scheduler"], True),
    ("override_opt_param_scheduler", "optimizer_config.override_opt_param_scheduler",
     ["--override-opt-param-scheduler"], True),
    ("weight_decay", "optimizer_config.weight_decay", ["--weight-decay", "0.1"], 0.1),
    ("overlap_param_gather", "optimizer_config.overlap_param_gather",
     ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"], True),
    ("start_weight_decay", "optimizer_config.start_weight_decay", _WD, 0.02),
    ("end_weight_decay", "optimizer_config.end_weight_decay", _WD, 0.2),
    ("weight_decay_incr_style", "optimizer_config.weight_decay_incr_style", _WD, "linear"),
    # parallel_config
    ("tensor_model_parallel_size", "parallel_config.tensor_model_parallel_size",
     ["--tensor-model-parallel-size", "2"], 2),
    ("context_parallel_size", "parallel_config.context_parallel_size", ["--context-parallel-size", "2"], 2),
    ("context_parallel_algo", "parallel_config.context_parallel_algo", ["--context-parallel-algo", "ulysses"],
     "ulysses"),
    ("ulysses_degree_in_cp", "parallel_config.ulysses_degree_in_cp",
     ["--context-parallel-size", "2", "--ulysses-degree-in-cp", "2"], 2),
    ("expert_model_parallel_size", "parallel_config.expert_model_parallel_size",
     ["--expert-model-parallel-size", "2", "--num-experts", "4"], 2),
    ("virtual_pipeline_model_parallel_size", "parallel_config.virtual_pipeline_model_parallel_size",
     ["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"], 2),
    ("num_layers_per_virtual_pipeline_stage", "parallel_config.num_layers_per_virtual_pipeline_stage",
     ["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], 2),
    ("sequence_parallel", "parallel_config.sequence_parallel", ["--tensor-model-parallel-size", "2",
                                                                "--sequence-parallel"], True),
    ("pipeline_model_parallel_size", "parallel_config.pipeline_model_parallel_size",
     ["--pipeline-model-parallel-size", "2"], 2),
    ("num_layer_list", "parallel_config.num_layer_list", ["--pipeline-model-parallel-size", "2", "--num-layer-list",
                                                          "1,1"], [1, 1]),
    ("recompute", "parallel_config.recompute", ["--recompute"], True),
    ("select_recompute", "parallel_config.select_recompute", ["--select-recompute"], True),
    ("select_comm_recompute", "parallel_config.select_comm_recompute", ["--select-comm-recompute"], True),
]



def test_document_002_tables_land_in_their_fields():
    mapped = set(A.CONFIG_MAP)
    _, default_cfg = configs()
    # rows whose test value equals the default: the only value mindtron has, a default-off fusion, and the
    # biases that default to on with Megatron's add_bias_linear (the Llama test checks them off), and
    # --enable-cuda-graph asking for the compiled layers that are mindtron's default (--no-jit-layers: off)
    same_as_default = {"transformer_impl", "ckpt_format", "apply_rope_fusion", "add_qkv_bias", "add_dense_bias",
                       "enable_cuda_graph"}
    wrong = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotImplementedFlagWarning)  # --num-experts in the EP row
        for name, target, cli, expected in DOC002_TABLES:
            assert name in mf.FLAGS_BY_DEST, f"{name} is not a flag"
            assert (name, target) in mapped, f"{name} -> {target} is missing in arguments.CONFIG_MAP"
            got = field_value(configs(cli)[1], target)
            if got != expected:
                wrong.append((name, target, got, expected))
            assert name in same_as_default or field_value(default_cfg, target) != expected, name
    assert not wrong, wrong


def test_documents_000_001_training_options():
    _, cfg = configs(["--use-clip-grad", "--max-grad-norm", "0.3", "--global-batch-size", "64",
                      "--gradient-accumulation-steps", "4", "--use-adaptive-loss-scale", "--loss-scale-value", "1024",
                      "--scale-factor", "3", "--scale-window", "50", "--max-scale-window", "400",
                      "--min-scale-window", "10"])
    t = cfg.training_config
    assert (t.use_clip_grad, t.max_grad_norm, cfg.optimizer_config.clip_grad) == (True, 0.3, 0.3)
    assert t.gradient_accumulation_steps == 4 and cfg.dataset_config.micro_batch_num == 4  # 64 / (2 x dp 8)
    assert (t.use_adaptive_loss_scale, t.loss_scale_value, t.scale_factor) == (True, 1024.0, 3.0)
    assert (t.loss_scale_window, t.max_scale_window, t.min_scale_window) == (50, 400, 10)
    # Megatron clips at --clip-grad 1.0 by default; --clip-grad 0 turns clipping off
    assert configs()[1].training_config.use_clip_grad
    _, off = configs(["--clip-grad", "0"])
    assert (off.training_config.use_clip_grad, off.optimizer_config.clip_grad) == (False, 0.0)


# -------------------------------------------------------------------------------------------------------
# Mapping bookkeeping
# -------------------------------------------------------------------------------------------------------
def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


SECTION_CLASSES = {"model_config": TransformerConfig, "training_config": TrainingConfig,
                   "dataset_config": DatasetConfig, "optimizer_config": OptimizerConfig,
                   "parallel_config": ParallelConfig}


def test_every_config_field_can_be_set_from_yaml():
    for section, cls in SECTION_CLASSES.items():
        for field in _fields(cls):
            assert (section, field) in Y.FIELD_TO_DEST or (section, field) in Y.FIELD_SPECIAL, \
                f"{section}.{field} has no flag"


# -------------------------------------------------------------------------------------------------------
# YAML
# -------------------------------------------------------------------------------------------------------
SECTIONED_YAML = """
model_config:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  seq_length: 32
  vocab_size: 1024
  hidden_act: swiglu
  normalization: RMSNorm
  norm_epsilon: 1e-6          # YAML reads this as text; converted like the command line
  attention_dropout_rate: 0.0
  add_bias_linear: false
  fa_config: {pre_tokens: 100, next_tokens: 0, input_layout: SBH}
training_config:
  training_iters: 5
  micro_batch_size: 2
  seed: 7
  max_grad_norm: 0.5
  resume_training: true
dataset_config:
  eos_token_id: 0
  drop_remainder: false
optimizer_config:
  learning_rate: 1.0e-3
  betas: [0.9, 0.95]
  lr_decay_style: cosine
parallel_config:
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 2
  num_layer_list: [3, 1]
  order: tp-cp-ep-pp-dp
  num_layers_per_virtual_pipeline_stage:   # null: not set
"""


def test_yaml_sections_load_and_explicit_flags_override(tmp_path):
    path = tmp_path / "pretrain_gpt.yaml"
    path.write_text(SECTIONED_YAML)
    args = parse_args(args=["--yaml-cfg", str(path), "--seed", "99", "--tensor-model-parallel-size", "1"],
                      world_size=4)
    cfg = init_configs_from_args(args)
    m, t = cfg.model_config, cfg.training_config
    assert (m.num_layers, m.vocab_size, m.hidden_act, m.ffn_hidden_size, m.norm_epsilon) == (4, 1024, "swiglu", 128,
                                                                                             1e-6)
    assert m.fa_config == {"pre_tokens": 100, "next_tokens": 0, "input_layout": "SBH"} and not m.add_bias_linear
    assert (t.seed, t.training_iters, t.max_grad_norm, t.resume_training) == (99, 5, 0.5, True)  # seed: CLI wins
    assert cfg.parallel_config.tensor_model_parallel_size == 1  # given on the CLI with its default value: still wins
    assert (cfg.parallel_config.num_layer_list, cfg.parallel_config.order) == ([3, 1], "tp-cp-ep-pp-dp")
    assert cfg.optimizer_config.betas == (0.9, 0.95) and cfg.optimizer_config.learning_rate == 1e-3
    assert (cfg.dataset_config.eos_token_id, cfg.dataset_config.drop_remainder) == (0, False)
    # without CLI flags, the file's values stand
    cfg2 = init_configs_from_args(parse_args(args=["--config", str(path)], world_size=4))
    assert (cfg2.training_config.seed, cfg2.parallel_config.tensor_model_parallel_size) == (7, 2)


def test_yaml_flat_megatron_names(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("num_layers: 2\nhidden-size: 64\n--num-attention-heads: 4\nseq_length: 32\n"
                    "micro_batch_size: 1\ntrain_iters: 3\ndisable_bias_linear: true\nswiglu: true\n"
                    "data_path: [a, b]\nlr: '3e-4'\n")
    args = parse_args(args=["--yaml-cfg", str(path), "--lr", "1e-3"], world_size=1)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (2, 64, 4, 32)
    assert args.add_bias_linear is False and args.hidden_act == "swiglu" and args.data_path == ["a", "b"]
    assert args.lr == 1e-3


def test_yaml_errors_name_the_key(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("model_config:\n  num_layer: 2\ntensor_model_paralel_size: 2\n")
    with pytest.raises(ValueError, match=r"model_config.num_layer; did you mean num_layers.*"
                                         r"tensor_model_paralel_size; did you mean tensor_model_parallel_size"):
        load_yaml_config(str(bad_key))
    assert load_yaml_config(str(bad_key), ignore_unknown=True) == {}
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("model_config:\n  normalization: BatchNorm\n")
    with pytest.raises(ValueError, match="model_config.normalization: invalid choice 'BatchNorm'"):
        load_yaml_config(str(bad_value))
    with pytest.raises(FileNotFoundError, match="--yaml-cfg"):
        parse_args(args=BASE + ["--yaml-cfg", str(tmp_path / "missing.yaml")])


# -------------------------------------------------------------------------------------------------------
# Unknown and not-implemented flags
# -------------------------------------------------------------------------------------------------------
def test_unknown_flag_suggests_the_closest():
    with pytest.raises(ValueError, match="--tensor-parallel-size; did you mean --tensor-model-parallel-size"):
        parse_args(args=BASE + ["--tensor-parallel-size", "2"])
    with pytest.raises(ValueError, match="--num-layer; did you mean --num-layers"):
        parse_args(args=BASE + ["--num-layer=4"])
    args = parse_args(args=BASE + ["--tensor-parallel-size", "2"], ignore_unknown_args=True, world_size=1)
    assert args.tensor_model_parallel_size == 1


def test_bad_values_raise_value_error_naming_the_flag():
    with pytest.raises(ValueError, match="--normalization: invalid choice"):
        parse_args(args=BASE + ["--normalization", "BatchNorm"])
    with pytest.raises(ValueError, match="--num-layers: invalid int value"):
        parse_args(args=BASE + ["--num-layers", "two"])


def test_not_implemented_flag_warns_once_and_only_when_set():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_args(args=BASE + ["--tp-comm-overlap-cfg", "/tp", "--attention-backend", "auto"], world_size=1)
        parse_args(args=BASE + ["--tp-comm-overlap-cfg", "/other"], world_size=1)
        parse_args(args=BASE, world_size=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, NotImplementedFlagWarning)]
    assert len(messages) == 1 and messages[0].startswith("--tp-comm-overlap-cfg ")  # auto is the default: silent
    assert "--tp-comm-overlap-cfg" in NOT_IMPLEMENTED and "--attention-backend" in NOT_IMPLEMENTED


def test_extra_args_provider_flags_are_accepted():
    def provider(parser):
        group = parser.add_argument_group(title="pangu")
        group.add_argument("--my-option", type=int, default=3)
        return parser

    with warnings.catch_warnings():
        warnings.simplefilter("error", NotImplementedFlagWarning)
        args = parse_args(provider, args=BASE + ["--my-option", "5"], world_size=1)
    assert args.my_option == 5


# -------------------------------------------------------------------------------------------------------
# Derived values (Megatron's validate_args)
# -------------------------------------------------------------------------------------------------------
def test_world_size_from_msrun_env_and_data_parallel_size(monkeypatch):
    monkeypatch.setenv("MS_WORKER_NUM", "8")
    args = parse_args(args=BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    assert (args.world_size, args.data_parallel_size) == (8, 2)
    monkeypatch.delenv("MS_WORKER_NUM")
    assert parse_args(args=BASE).world_size == 1
    with pytest.raises(ValueError, match=r"world size \(6\) is not divisible by --tensor-model-parallel-size 2 x "
                                         r"--pipeline-model-parallel-size 2 x --context-parallel-size 1 = 4"):
        parse_args(args=BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                   world_size=6)


def test_global_batch_size():
    args, cfg = configs(world_size=8)  # micro 2, dp 8
    assert args.global_batch_size == 16 and cfg.training_config.gradient_accumulation_steps == 1
    args, cfg = configs(["--global-batch-size", "64"], world_size=8)
    assert args.gradient_accumulation_steps == 4 and cfg.dataset_config.micro_batch_num == 4
    args, _ = configs(["--gradient-accumulation-steps", "3"], world_size=4)
    assert args.global_batch_size == 2 * 4 * 3
    with pytest.raises(ValueError, match=r"global batch size \(20\) is not divisible by micro batch size \(2\) "
                                         r"times data parallel size \(8\)"):
        configs(["--global-batch-size", "20"], world_size=8)
    with pytest.raises(ValueError, match="--gradient-accumulation-steps 3 does not match"):
        configs(["--global-batch-size", "64", "--gradient-accumulation-steps", "3"], world_size=8)


def test_virtual_pipeline_size():
    args, cfg = configs(["--num-layers", "16", "--pipeline-model-parallel-size", "4",
                         "--num-layers-per-virtual-pipeline-stage", "2"], world_size=8)
    assert args.virtual_pipeline_model_parallel_size == (16 // 4) // 2 == 2
    assert cfg.parallel_config.virtual_pipeline_model_parallel_size == 2
    args, _ = configs(["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "4"], world_size=8)
    assert args.virtual_pipeline_model_parallel_size is None  # one chunk per stage is no interleaving
    with pytest.raises(ValueError, match=r"number of layers per pipeline stage \(6\) must be divisible by "
                                         r"--num-layers-per-virtual-pipeline-stage 4"):
        configs(["--num-layers", "12", "--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "4"], world_size=8)
    with pytest.raises(ValueError, match="needs --pipeline-model-parallel-size > 2"):
        configs(["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--no-overlap-p2p-communication",
                 "--num-layers-per-virtual-pipeline-stage", "2"], world_size=8)
    with pytest.raises(ValueError, match="--num-layers 3 should be divisible by --pipeline-model-parallel-size 2"):
        configs(["--num-layers", "3", "--pipeline-model-parallel-size", "2"], world_size=8)
    with pytest.raises(ValueError, match=r"--num-layer-list \[1, 1\] must be non-negative counts summing to "
                                         "--num-layers 4"):
        configs(["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layer-list", "1,1"])


def test_ffn_hidden_size_rule():
    assert configs()[0].ffn_hidden_size == 4 * 64
    assert configs(["--swiglu"])[0].ffn_hidden_size == int((4 * 64 * 2 / 3) / 64) * 64 == 128
    assert configs(["--hidden-size", "4096", "--num-attention-heads", "32", "--swiglu"])[0].ffn_hidden_size == 10880
    assert configs(["--swiglu", "--ffn-hidden-size", "200"])[0].ffn_hidden_size == 200
    assert configs(["--openai-gelu"])[1].model_config.hidden_act == "gelu_tanh"
    assert configs(["--squared-relu"])[1].model_config.hidden_act == "squared_relu"
    with pytest.raises(ValueError, match="--swiglu and --squared-relu"):
        configs(["--swiglu", "--squared-relu"])


def test_warmup_fraction_and_train_length():
    args, cfg = configs(["--lr-warmup-fraction", "0.1", "--lr", "1e-3"])
    assert (cfg.optimizer_config.lr_warmup_fraction, cfg.optimizer_config.lr_warmup_iters) == (0.1, 0)
    with pytest.raises(ValueError, match="can only specify one of --lr-warmup-fraction and --lr-warmup-iters"):
        configs(["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"])
    with pytest.raises(ValueError, match="give --train-iters or --train-samples, not both"):
        configs(["--train-samples", "100"])
    samples = BASE[:-2] + ["--train-samples", "160"]
    args, cfg = configs(base=samples, world_size=8)
    assert args.train_iters is None and cfg.training_config.training_iters == 160 // 16
    assert cfg.training_config.train_samples == 160
    with pytest.raises(ValueError, match="--lr-warmup-iters needs iteration-based training"):
        configs(["--lr-warmup-iters", "5"], base=samples)


def test_model_checks_name_the_flag():
    with pytest.raises(ValueError, match="--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"):
        configs(["--tensor-model-parallel-size", "8"])
    with pytest.raises(ValueError, match="--hidden-size 66 is not divisible by --num-attention-heads 4"):
        configs(["--hidden-size", "66"])
    assert configs(["--hidden-size", "66", "--kv-channels", "16"])[1].model_config.kv_channels == 16
    with pytest.raises(ValueError, match="--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"):
        configs(["--group-query-attention", "--tensor-model-parallel-size", "2"])
    with pytest.raises(ValueError, match=r"max_position_embeddings \(64\) must be greater than or equal to "
                                         r"seq_length \(128\)"):
        configs(["--seq-length", "128"])
    with pytest.raises(ValueError, match="--fp16 and --bf16 exclude each other"):
        configs(["--fp16", "--bf16"])
    with pytest.raises(ValueError, match="--fp16-lm-cross-entropy needs --fp16"):
        configs(["--fp16-lm-cross-entropy"])
    with pytest.raises(ValueError, match="--num-layers is required"):
        parse_args(args=BASE[2:])
    with pytest.raises(ValueError, match="--micro-batch-size is required"):
        parse_args(args=BASE[:10] + BASE[12:])
    with pytest.raises(ValueError, match="--save needs a positive --save-interval"):
        configs(["--save", "/ckpt"])
    with pytest.raises(ValueError, match="--batch-size is no longer valid; use --micro-batch-size"):
        configs(["--batch-size", "4"])
    with pytest.raises(ValueError, match="--optimizer muon is not available"):
        configs(["--optimizer", "muon"])


def test_dtypes_padded_vocab_and_sequence_parallel():
    args, cfg = configs(["--fp16"])
    assert (args.params_dtype, cfg.model_config.compute_dtype, cfg.model_config.embedding_init_dtype) == \
        ("float16",) * 3
    assert configs()[0].params_dtype == "float32"
    args, cfg = configs(["--vocab-size", "50257", "--tensor-model-parallel-size", "2"])
    assert args.padded_vocab_size == 50432 == cfg.model_config.vocab_size  # next multiple of 128 x 2
    args, cfg = configs(["--vocab-size", "1000", "--make-vocab-size-divisible-by", "64"])
    assert cfg.model_config.vocab_size == 1024
    assert configs(["--sequence-parallel"])[0].sequence_parallel is False  # tp 1: Megatron turns it off
    assert configs(["--position-embedding-type", "rope"])[1].model_config.apply_rope_fusion  # Megatron's default
    assert not configs()[1].model_config.apply_rope_fusion  # no rope, no rope fusion


def test_validation_is_repeatable():
    args = parse_args(args=LLAMA, world_size=64)
    before = dict(vars(args))
    A.validate_args(args, world_size=64)
    assert vars(args) == before


def test_args_defaults_fill_only_unset_arguments():
    args = parse_args(args=["--num-layers", "6"], world_size=1, args_defaults={
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "micro_batch_size": 1})
    assert (args.num_layers, args.hidden_size, args.global_batch_size) == (6, 64, 1)


def test_parse_args_reads_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"] + BASE + ["--seed", "5"])
    assert parse_args(world_size=1).seed == 5


def test_global_args():
    with pytest.raises(RuntimeError, match="not parsed yet"):
        get_args()
    args = parse_args(args=BASE, world_size=1)
    set_args(args)
    assert get_args() is args
    assert init_configs_from_args().model_config.num_layers == 2


def test_compiled_layers_are_the_default_and_no_jit_layers_turns_them_off(tmp_path):
    assert configs()[1].model_config.jit_layers is True
    assert configs(["--enable-cuda-graph"])[1].model_config.jit_layers is True
    assert configs(["--no-jit-layers"])[1].model_config.jit_layers is False
    with pytest.raises(ValueError, match="--enable-cuda-graph .* --no-jit-layers"):
        configs(["--enable-cuda-graph", "--no-jit-layers"])
    for value, expected in (("false", False), ("true", True)):
        path = tmp_path / f"jit_{value}.yaml"
        path.write_text(f"model_config:\n  jit_layers: {value}\n")
        assert configs(["--yaml-cfg", str(path)])[1].model_config.jit_layers is expected
