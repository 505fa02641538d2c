"""Pipeline schedules against the single-stage model: per-micro-batch losses and every parameter's gradient
(summed over micro-batches) for several layouts. Returns {check name: relative error} plus in-flight counts."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
from mindspore import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model_configs import make_config  # noqa: E402
from numerics import rel_err  # noqa: E402

from mindtron.data.gpt_batch import make_gpt_batch  # noqa: E402
from mock_data import MockGPTDataset  # noqa: E402
from mindtron.legacy_model import GPTModel  # noqa: E402
from mindtron.parallel_core import comm, parallel_state as ps, tensor_parallel as tp  # noqa: E402
from mindtron.parallel_core.distributed import (allreduce_embedding_grads,  # noqa: E402
                                                allreduce_sequence_parallel_grads)
from mindtron.parallel_core.pipeline_parallel import get_forward_backward_func  # noqa: E402

SEED, MICRO, MBS = 77, 4, 2


def micro_batches(cfg):
    ds = MockGPTDataset(MICRO * MBS, cfg.seq_length, cfg.vocab_size, seed=SEED)
    for m in range(MICRO):
        text = np.stack([ds[m * MBS + i]["text"] for i in range(MBS)])
        yield {k: Tensor(v) for k, v in make_gpt_batch(text, 0).items()}


def build_chunks(cfg):
    """This rank's model chunks (one without virtual stages), each with its pre/post-process role."""
    chunks = []
    for c in range(ps.get_virtual_pipeline_model_parallel_world_size() or 1):
        if ps.get_virtual_pipeline_model_parallel_world_size():
            ps.set_virtual_pipeline_model_parallel_rank(c)
        chunks.append(GPTModel(cfg, pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage()))
    return chunks


def run(cfg, **layout):
    """(losses, {layout-independent name: summed grad shard}, max in flight, stage) for this rank."""
    ps.initialize_model_parallel(**layout)
    tp.model_parallel_seed(SEED)
    chunks = build_chunks(cfg)

    def step(batch, x, chunk=0):
        model = chunks[chunk]
        if x is not None:
            model.set_input_tensor(x)
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["loss_mask"],
                     labels=batch["labels"])

    per_chunk = [m.trainable_params() for m in chunks]
    params = [p for chunk in per_chunk for p in chunk]
    seq = cfg.seq_length // (ps.get_tensor_model_parallel_world_size() if cfg.sequence_parallel else 1)
    result = get_forward_backward_func()(step=step, batches=micro_batches(cfg),
                                         params=per_chunk if len(chunks) > 1 else params,
                                         num_microbatches=MICRO, tensor_shape=(seq, MBS, cfg.hidden_size))
    grads = allreduce_embedding_grads(params, allreduce_sequence_parallel_grads(params, result.grads))
    owner = [m for m, chunk in zip(chunks, per_chunk) for _ in chunk]
    named = {m.layout_independent_name(p.name): (p, g.asnumpy()) for m, p, g in zip(owner, params, grads)}
    losses = [float(l.asnumpy()) for l in result.losses]
    stage = ps.get_pipeline_model_parallel_rank()
    ps.destroy_model_parallel()
    return losses, named, result.max_in_flight, stage


def compare(name: str, cfg, **layout) -> dict:
    ref_losses, ref, _, _ = run(dataclasses.replace(cfg, num_layer_list=None))  # one stage holds all layers
    losses, grads, in_flight, stage = run(cfg, **layout)
    limit = layout.get("pipeline_model_parallel_size", 1) - stage
    if layout.get("virtual_pipeline_model_parallel_size"):  # Megatron's interleaved warm-up bound
        pp, v = layout["pipeline_model_parallel_size"], layout["virtual_pipeline_model_parallel_size"]
        limit = MICRO * v if MICRO == pp else min((pp - stage - 1) * 2 + (v - 1) * pp + 1, MICRO * v)
    out = {f"{name}/in_flight_over_limit": float(in_flight > limit)}
    if losses:
        out[f"{name}/losses"] = rel_err(losses, ref_losses)
    for pname, (param, grad) in grads.items():
        if pname == "word_embeddings_for_head.weight":
            continue
        out[f"{name}/grad/{pname}"] = rel_err(grad, param.shard_spec.shard(ref[pname][1]))
    return out


def odd_microbatches_refused(cfg) -> float:
    """Interleaving with a micro-batch count that is not a multiple of pp fails before communicating."""
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    try:
        get_forward_backward_func()(step=None, batches=iter(()), params=[[], []], num_microbatches=3,
                                    tensor_shape=(cfg.seq_length, MBS, cfg.hidden_size))
    except ValueError as err:
        return 0.0 if "multiple of --pipeline-model-parallel-size 2" in str(err) else 1.0
    finally:
        ps.destroy_model_parallel()
    return 1.0


def main() -> dict:
    world = comm.get_world_size()
    out = {}
    gpt2, llama = make_config("gpt2", num_layers=4), make_config("llama", num_layers=4)
    if world == 2:
        out.update(compare("pp2_gpt2", gpt2, pipeline_model_parallel_size=2))
        out.update(compare("pp2_llama", llama, pipeline_model_parallel_size=2))
        out.update(compare("pp2_vpp2_gpt2", gpt2, pipeline_model_parallel_size=2,
                           virtual_pipeline_model_parallel_size=2))
        out["pp2_vpp2/odd_microbatches_refused"] = odd_microbatches_refused(gpt2)
    if world == 3:  # odd size, uneven layers
        out.update(compare("pp3_uneven_gpt2", make_config("gpt2", num_layers=4, num_layer_list=[2, 1, 1]),
                           pipeline_model_parallel_size=3))
    if world == 4:
        out.update(compare("pp4_vpp2_gpt2", make_config("gpt2", num_layers=8), pipeline_model_parallel_size=4,
                           virtual_pipeline_model_parallel_size=2))
        out.update(compare("pp4_gpt2", gpt2, pipeline_model_parallel_size=4))
        out.update(compare("pp2_tp2_sp_llama", make_config("llama", num_layers=4, sequence_parallel=True),
                           pipeline_model_parallel_size=2, tensor_model_parallel_size=2))
    return out
