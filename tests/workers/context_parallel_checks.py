"""Context parallelism against the single-process model, on 2 and 4 ranks (tests/test_context_parallel.py).

Model checks: the loss and every parameter's gradient of GPTModel under a context-parallel layout against
the same model on one rank (gradients of replicated parameters summed over the context ranks, as the dp x cp
reduction does; TP-split ones against their shard). Training runs: pretrain() under a layout; the test
compares the per-iteration losses and gradient norms with the single-process run it does itself.
"""
import sys
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_configs import make_config  # noqa: E402
from training_checks import make_config as training_config, train  # noqa: E402
from numerics import rel_err  # noqa: E402
from moe_checks import moe_options  # noqa: E402

from mindtron.legacy_model import GPTModel  # noqa: E402
from mindtron.legacy_model.eod_mask import get_ltor_masks_and_position_ids  # noqa: E402
from mindtron.parallel_core import comm, parallel_state as ps, tensor_parallel as tp  # noqa: E402
from mindtron.parallel_core.context_parallel import get_batch_on_this_cp_rank  # noqa: E402
from mindtron.parallel_core.distributed import allreduce_sequence_parallel_grads  # noqa: E402

SEED = 4321
STEPS = 3


def batch(cfg, loss_mask: bool = True, eod_masks: bool = False) -> dict:
    """Two sequences of random ids; a random loss mask; with `eod_masks` per-document attention masks and
    position ids (Megatron's --reset-attention-mask / --reset-position-ids) around id 0."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, (2, cfg.seq_length))
    out = {"tokens": tokens.astype(np.int32), "labels": np.roll(tokens, -1, 1).astype(np.int32),
           "loss_mask": (rng.random(tokens.shape) > 0.3).astype(np.float32) if loss_mask else None}
    if eod_masks:
        tokens[:, [3, 9]] = 0
        out["tokens"] = tokens.astype(np.int32)
        mask, _, positions = get_ltor_masks_and_position_ids(tokens, 0, True, True)
        out["attention_mask"], out["position_ids"] = mask, positions
    return out


def run(cfg, data: dict):
    """(loss, {name: (param, grad)}) of a freshly built model on this rank's part of `data`."""
    tp.model_parallel_seed(SEED)
    model = GPTModel(cfg)
    local = get_batch_on_this_cp_rank(dict(data), cfg.seq_length)
    args = [Tensor(local[k]) if local.get(k) is not None else None
            for k in ("tokens", "position_ids", "attention_mask", "loss_mask", "labels")]
    params = model.trainable_params()

    def loss_fn(tokens, labels):
        return model(tokens, args[1], args[2], args[3], labels=labels)

    loss, grads = ms.value_and_grad(loss_fn, None, params)(args[0], args[4])
    grads = allreduce_sequence_parallel_grads(params, grads)
    cp_group = ps.get_context_parallel_group()
    if cp_group.size > 1:  # what the dp x cp average of the gradient buffer does for the cp part
        grads = [comm.all_reduce(g, cp_group) / cp_group.size for g in grads]
        loss = comm.all_reduce(loss.reshape(1), cp_group)[0] / cp_group.size
    return float(loss), {p.name: (p, g.asnumpy()) for p, g in zip(params, grads)}


def model_check(tag: str, name: str, cp: int, tp_size: int = 1, sp: bool = False, loss_mask: bool = True,
                eod_masks: bool = False, **model) -> dict:
    """{tag/loss, tag/grad/<param>: relative error} of a context-parallel layout against one rank."""
    ps.initialize_model_parallel()
    ref_loss, ref = run(make_config(name, **model), batch(make_config(name, **model), loss_mask, eod_masks))
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp_size, context_parallel_size=cp)
    cfg = make_config(name, sequence_parallel=sp, **model)
    loss, grads = run(cfg, batch(cfg, loss_mask, eod_masks))
    ps.destroy_model_parallel()
    out = {f"{tag}/loss": rel_err(loss, ref_loss)}
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    for pname, (param, grad) in grads.items():
        want = ref[pname][1]
        spec = getattr(param, "shard_spec", None)
        out[f"{tag}/grad/{pname}"] = rel_err(grad, spec.shard(want) if spec is not None else want)
    return out


def training_run(cp: int, comm_type=None, steps: int = STEPS, model_options=None, **layout) -> dict:
    """pretrain() of training_checks' tiny GPT (RoPE, loss mask on EOD tokens) under a context-parallel
    layout: per-iteration losses and gradient norms."""
    cfg = cp_training_config(cp, comm_type, steps, model_options, **layout)
    return train(cfg)


def cp_training_config(cp: int, comm_type=None, steps: int = STEPS, model_options=None, **layout):
    """training_checks.make_config with --context-parallel-size `cp` and --cp-comm-type `comm_type`."""
    options = dict(model_options or {})
    if comm_type is not None:
        options["cp_comm_type"] = [comm_type] if isinstance(comm_type, str) else list(comm_type)
    cfg = training_config(steps=steps, model_options=options, dataset_options={"eod_mask_loss": True},
                          eval_interval=None, eval_iters=0, **layout)
    cfg.parallel_config.context_parallel_size = cp
    return cfg


# One check of every algorithm in the default run ------------------------------------------------------
def quick_2() -> dict:
    """2 ranks: ring, Ulysses and all-gather on the Llama-style model (RoPE, GQA, loss mask); ring on the
    GPT-2 model (learned position embeddings: each rank's true positions); a ring training run."""
    out = {}
    out.update(model_check("llama/p2p2", "llama", 2, cp_comm_type=["p2p"]))
    out.update(model_check("gpt2/p2p2/no_mask", "gpt2", 2, loss_mask=False, cp_comm_type=["p2p"]))
    out.update(model_check("llama/a2a2", "llama", 2, cp_comm_type=["a2a"]))
    out.update(model_check("llama/allgather2", "llama", 2, cp_comm_type=["allgather"]))
    out["train/p2p2"] = training_run(2, "p2p")
    return out


def quick_4() -> dict:
    """4 ranks: ring CP=4, hybrid 2 x 2, CP=2 x TP=2 with SP (model checks); CP=2 x DP=2 with the
    distributed optimizer and CP=2 x PP=2 (training runs)."""
    out = {}
    out.update(model_check("llama/p2p4", "llama", 4, cp_comm_type=["p2p"]))
    out.update(model_check("llama/hybrid2x2", "llama", 4, cp_comm_type=["a2a+p2p"],
                           hierarchical_context_parallel_sizes=[2, 2]))
    out.update(model_check("llama/p2p2_tp2_sp", "llama", 2, tp_size=2, sp=True, cp_comm_type=["p2p"]))
    out["train/p2p2_dp2_distopt"] = training_run(2, "p2p", use_distributed_optimizer=True)
    out["train/p2p2_pp2"] = training_run(2, "p2p", pp=2)
    return out


# The exhaustive matrix (slow) ---------------------------------------------------------------------------
def full_2() -> dict:
    """Learned positions without a loss mask (Ulysses, all-gather), sliding windows and sinks, layer scaling, gated attention with
    QK norms, per-document masks, one type per layer, document 002's algorithm names; training with
    Ulysses, all-gather, recompute, jit_layers and an MoE model (names under train/moe/)."""
    out = {}
    for kind in ("p2p", "a2a", "allgather"):
        if kind != "p2p":  # gpt2/p2p2/no_mask runs in the default launch (quick_2)
            out.update(model_check(f"gpt2/{kind}2/no_mask", "gpt2", 2, loss_mask=False, cp_comm_type=[kind]))
        out.update(model_check(f"gptoss/{kind}2", "gptoss", 2, cp_comm_type=[kind]))
        out.update(model_check(f"llama/{kind}2/eod", "llama", 2, eod_masks=True, cp_comm_type=[kind]))
    out.update(model_check("options/p2p2", "options", 2, num_attention_heads=4, cp_comm_type=["p2p"]))
    out.update(model_check("qwen/a2a2", "qwen", 2, cp_comm_type=["a2a"]))
    out.update(model_check("options2/p2p2", "options2", 2, cp_comm_type=["p2p"]))
    out.update(model_check("llama/per_layer2", "llama", 2, cp_comm_type=["a2a", "p2p"]))
    out.update(model_check("llama/algo_ulysses2", "llama", 2, context_parallel_algo="ulysses"))
    out["train/a2a2"] = training_run(2, "a2a")
    out["train/allgather2"] = training_run(2, "allgather")
    out["train/p2p2_recompute"] = training_run(2, "p2p", model_options={"recompute_granularity": "full",
                                                                        "recompute_method": "uniform"})
    out["train/p2p2_selective"] = training_run(2, "p2p", model_options={"recompute_granularity": "selective"})
    out["train/p2p2_jit"] = training_run(2, "p2p", model_options={"jit_layers": True})
    out["train/moe/p2p2"] = training_run(2, "p2p", model_options=moe_options())
    out["train/per_token/p2p2"] = training_run(2, "p2p", model_options={"calculate_per_token_loss": True})
    # attention dropout under CP draws per-block masks: recompute must replay them (same losses both ways)
    drop = {"attention_dropout_rate": 0.2}
    out["dropout/p2p2"] = training_run(2, "p2p", model_options=drop)
    out["dropout/p2p2_selective"] = training_run(2, "p2p", model_options={**drop, "recompute_granularity": "selective"})
    out["dropout/p2p2_full"] = training_run(2, "p2p", model_options={**drop, "recompute_granularity": "full",
                                                                      "recompute_method": "uniform"})
    return out


def full_4() -> dict:
    """CP=4 Ulysses and all-gather, ring CP=2 x TP=2 without SP, Ulysses CP=2 x TP=2 + SP, the hybrid with
    learned positions; training: CP=4, hybrid, CP=2 x TP=2 + SP, CP=2 x PP=2 x VPP=2, CP=2 x DP=2, MoE with
    Ulysses CP=2 x EP=2."""
    out = {}
    out.update(model_check("gpt2/a2a4", "gpt2", 4, cp_comm_type=["a2a"]))
    out.update(model_check("llama/allgather4", "llama", 4, cp_comm_type=["allgather"]))
    out.update(model_check("llama/p2p2_tp2", "llama", 2, tp_size=2, cp_comm_type=["p2p"]))
    out.update(model_check("gpt2/a2a2_tp2_sp", "gpt2", 2, tp_size=2, sp=True, loss_mask=False, cp_comm_type=["a2a"]))
    out.update(model_check("gpt2/hybrid2x2", "gpt2", 4, cp_comm_type=["a2a+p2p"], ulysses_degree_in_cp=2))
    out["train/p2p4"] = training_run(4, "p2p")
    out["train/hybrid2x2"] = training_run(4, "a2a+p2p", model_options={"hierarchical_context_parallel_sizes": [2, 2]})
    out["train/p2p2_tp2_sp"] = training_run(2, "p2p", tp=2, sp=True)
    out["train/p2p2_pp2_vpp2"] = training_run(2, "p2p", pp=2, vpp=2)
    out["train/allgather2_dp2"] = training_run(2, "allgather")
    out["train/moe/a2a2_ep2"] = training_run(2, "a2a", model_options=moe_options(), ep=2)
    return out


