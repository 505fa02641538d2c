"""MoE training runs under expert-parallel layouts; each returns its loss curve, gradient norms and MoE
statistics, so tests can compare them with the single-process run. Used in one process (pytest itself)
and on 2 and 4 ranks through run_on_ranks."""
import json
import os
import shutil
import tempfile
from pathlib import Path

from mindtron.parallel_core import comm
from mindtron.parallel_core.moe import MoEConfig
from mindtron.training.hot_expert_monitor import ColdHotExpertMonitor
from workers.training_checks import make_config, train

STEPS = 3
# hot experts: dropless (the same model as without), re-chosen every iteration
HOT = {"moe_token_dispatcher_type": "alltoall", "enable_cold_hot_expert": True, "hot_expert_num": 1,
       "hot_expert_update_step": 1}
# with drops: the cold experts get half the capacity, re-chosen every 2 iterations
HOT_DROPS = {**HOT, "hot_expert_update_step": 2, "moe_expert_capacity_factor": 1.0, "cold_token_percent": 0.5}


def moe_options(layers: int = 2, **moe) -> dict:
    """A tiny Mixtral-style MoE GPT (RMSNorm, RoPE, SwiGLU experts, no biases): `layers` MoE layers of 4
    experts, top-2, aux and z losses."""
    settings = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01,
                    moe_z_loss_coeff=1e-3)
    settings.update(moe)
    return {"moe_config": MoEConfig(**settings), "add_bias_linear": False, "num_layers": layers}


def run(ep=1, tp=1, sp=False, pp=1, etp=None, vpp=None, layers=2, steps=STEPS, moe=None, callbacks=None,
        **training) -> dict:
    """pretrain() of the MoE GPT under a layout; the result of training_checks.train plus MoE statistics, the
    hot-expert choices of a ColdHotExpertMonitor and the bytes this rank sent (comm.traffic())."""
    stats, choices = [], []

    def keep(trainer):
        stats.extend(r.moe for r in trainer.history)
        choices.extend(c for cb in trainer.callbacks.find(ColdHotExpertMonitor) for c in cb.choices)

    config = make_config(tp=tp, sp=sp, pp=pp, vpp=vpp, ep=ep, etp=etp, steps=steps,
                         model_options=moe_options(layers, **(moe or {})),
                         eval_interval=None, eval_iters=0, **training)
    comm.reset_traffic()
    result = train(config, on_finish=keep, callbacks=callbacks)
    result["traffic"] = comm.traffic()
    result["moe_losses"] = [s.losses for s in stats]
    result["tokens"] = [{k: v.tolist() for k, v in s.tokens_per_expert.items()} for s in stats]
    result["kept"] = [{k: v.tolist() for k, v in s.kept_tokens_per_expert.items()} for s in stats]
    result["choices"] = choices
    return result


def resume_across(first: dict, second: dict, steps: int = STEPS, save_at: int = 2) -> dict:
    """The run of layout `first` stopped and saved at `save_at`, then resumed from the checkpoint with layout
    `second` (another expert-parallel size, say): its losses must be those of the uninterrupted run."""
    if "MS_SCHED_PORT" in os.environ:  # every rank of this launch must write into the same directory
        root = os.path.join(tempfile.gettempdir(), f"mindtron_moe_ckpt_{os.environ['MS_SCHED_PORT']}_{len(str(second))}")
    else:
        root = tempfile.mkdtemp(prefix="mindtron_moe_ckpt_")
    try:
        head = run(steps=steps, output_dir=root, exit_interval=save_at, **first)
        meta = sorted(Path(root).glob(f"iter_{save_at:07d}/mp_rank_*/meta.json"))[0]
        saved_callbacks = json.loads(meta.read_text())["callbacks"]
        comm.barrier()
        tail = run(steps=steps, load_checkpoint=root, **second)
    finally:
        comm.barrier()
        shutil.rmtree(root, ignore_errors=True)
    return {"resumed": head["loss"] + tail["loss"], "last_stage": tail["last_stage"],
            "choices": head["choices"] + tail["choices"], "saved_callbacks": saved_callbacks}


def layouts_2() -> dict:
    """On 2 ranks: EP=2 with either dispatcher, grouped experts, the distributed optimizer; TP=2 with sequence
    parallel and its experts spread over the two ranks (expert tensor parallel 1, EP=2); checkpoints saved at
    EP=2 resumed at EP=2 and EP=1 (also with the distributed optimizer); hot experts."""
    return {
        "ep2_allgather": run(ep=2),
        "ep2_alltoall": run(ep=2, moe={"moe_token_dispatcher_type": "alltoall"}),
        "ep2_grouped": run(ep=2, moe={"moe_token_dispatcher_type": "alltoall", "moe_grouped_gemm": True}),
        "ep2_distopt": run(ep=2, use_distributed_optimizer=True),
        "tp2_sp_ep2_etp1": run(tp=2, sp=True, ep=2, etp=1, moe={"moe_token_dispatcher_type": "alltoall"}),
        "resume_ep2": resume_across(dict(ep=2), dict(ep=2)),
        "resume_ep2_to_ep1": resume_across(dict(ep=2), dict(ep=1)),
        "resume_ep2_distopt_to_ep1": resume_across(dict(ep=2, use_distributed_optimizer=True),
                                                   dict(ep=1, use_distributed_optimizer=True)),
        # hot experts: the single-process model, also under TP=2 + SP; with drops, stopped after iteration 1
        # (its monitor holding one iteration's counts) and resumed
        "ep2_hot": run(ep=2, moe=HOT),
        "tp2_sp_ep2_etp1_hot": run(tp=2, sp=True, ep=2, etp=1, moe=HOT),
        "ep2_hot_drops": run(ep=2, moe=HOT_DROPS),
        "resume_ep2_hot_drops": resume_across(dict(ep=2, moe=HOT_DROPS), dict(ep=2, moe=HOT_DROPS), save_at=1),
    }


def layouts_4() -> dict:
    """On 4 ranks: EP=4; EP=2 x TP=2 (+SP, experts split over tp too) with both dispatchers; EP=2 x PP=2 x
    virtual stages 2 (4 layers: one per model chunk); hot experts at EP=4, EP=2 x expert DP 2, EP=2 x PP=2."""
    return {
        "ep4_alltoall": run(ep=4, moe={"moe_token_dispatcher_type": "alltoall"}),
        "ep2_tp2_sp": run(ep=2, tp=2, sp=True),
        "ep2_tp2_sp_alltoall": run(ep=2, tp=2, sp=True, moe={"moe_token_dispatcher_type": "alltoall"}),
        "ep2_pp2_vpp2_4_layers": run(ep=2, pp=2, vpp=2, layers=4, moe={"moe_token_dispatcher_type": "alltoall"}),
        # hot experts at EP=4 (2 of 4 experts hot), at EP=2 with expert data parallel 2, and at EP=2 x PP=2
        "ep4_hot": run(ep=4, moe={**HOT, "hot_expert_num": 2}),
        "ep2_edp2_hot": run(ep=2, moe=HOT),
        "ep2_pp2_hot": run(ep=2, pp=2, moe=HOT),
    }

