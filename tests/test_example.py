"""The GPT example: its YAML configs load into the configs they describe, and pretrain_gpt.sh trains the tiny
Mixtral with expert parallelism. (The quick start itself, pretrain_gpt.sh on the bundled corpus, is checked by
tests/test_docs.py against the README's quick-start block.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from multiproc import REPO, free_port
from mindtron.training.arguments import init_configs_from_args, parse_args

EXAMPLE = REPO / "examples" / "gpt"
STEP = re.compile(r"Epoch: 0, Step: (\d+), Loss: ([0-9.]+), Time: ([0-9.]+) ms")


@pytest.mark.parametrize("name", ["tiny_gpt2.yaml", "tiny_llama.yaml", "tiny_mixtral.yaml"])
def test_example_yaml_configs_load(name):
    path = EXAMPLE / "configs" / name
    cfg = init_configs_from_args(parse_args(args=["--yaml-cfg", str(path), "--vocab-size", "1023",
                                                  "--tokenizer-type", "NullTokenizer"], world_size=2))
    m, t, o, p = cfg.model_config, cfg.training_config, cfg.optimizer_config, cfg.parallel_config
    assert (m.num_layers, m.hidden_size, m.seq_length, m.vocab_size) == (2, 64, 64, 1024)
    assert (t.training_iters, t.micro_batch_size, t.global_batch_size, o.learning_rate) == (100, 4, 8, 2e-3)
    if name == "tiny_mixtral.yaml":
        moe = m.moe_config
        assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size, moe.moe_aux_loss_coeff) == (8, 2, 128,
                                                                                                            0.01)
        assert moe.moe_grouped_gemm and moe.moe_token_dispatcher_type == "alltoall"
        assert p.expert_model_parallel_size == 2 and m.hidden_act == "swiglu" and not m.add_bias_linear
    elif name == "tiny_llama.yaml":
        assert (m.normalization, m.hidden_act, m.position_embedding_type, m.num_query_groups) == \
            ("RMSNorm", "swiglu", "rope", 2)
        assert m.untie_embeddings_and_output_weights and not m.add_bias_linear
        assert (p.tensor_model_parallel_size, p.sequence_parallel) == (2, True)
    else:
        assert (m.normalization, m.hidden_act, p.tensor_model_parallel_size) == ("LayerNorm", "gelu", 1)


def test_pretrain_gpt_sh_trains_the_tiny_mixtral_with_expert_parallelism(tmp_path):
    """The README's MoE line: CONFIG=examples/gpt/configs/tiny_mixtral.yaml bash examples/gpt/pretrain_gpt.sh
    (8 experts spread over 2 workers) trains on the bundled corpus and logs the load-balancing loss."""
    env = dict(os.environ, WORKERS="2", MASTER_PORT=str(free_port()), LOG_DIR=str(tmp_path / "logs"),
               CONFIG=str(EXAMPLE / "configs" / "tiny_mixtral.yaml"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    run = subprocess.run(["bash", str(EXAMPLE / "pretrain_gpt.sh"), "--train-iters", "12", "--log-interval", "4",
                          "--eval-interval", "12", "--eval-iters", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    last_rank_log = (tmp_path / "logs" / "worker_1.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + last_rank_log[-3000:]
    losses = {int(s): float(l) for s, l, _ in STEP.findall(last_rank_log)}
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1] - 0.5, losses
    balance = [float(v) for v in re.findall(r"load_balancing_loss: ([0-9.E+-]+)", last_rank_log)]
    assert len(balance) == 3 and all(0.9 < v < 2.0 for v in balance), balance  # 1 = perfectly balanced
