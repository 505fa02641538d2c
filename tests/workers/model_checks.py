"""GPTModel on 2 ranks: TP=2 and TP=2 with sequence parallel against TP=1 (logits, loss, every parameter's
gradient; also for the GPT-OSS and Qwen style option sets), and two pipeline stages against the whole model
(even split, an explicit layout, the loss counted as a layer, a fixed first-stage share). Returns
{check name: relative error}."""
import sys
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model_configs import make_config  # noqa: E402
from numerics import rel_err  # noqa: E402

from mindtron.legacy_model import GPTModel  # noqa: E402
from mindtron.parallel_core import comm, parallel_state as ps, tensor_parallel as tp  # noqa: E402
from mindtron.parallel_core.distributed import allreduce_sequence_parallel_grads  # noqa: E402

SEED = 4321


def data(cfg):
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, (2, cfg.seq_length))
    loss_mask = (rng.random(tokens.shape) > 0.2).astype(np.float32)
    return Tensor(tokens, ms.int32), Tensor(np.roll(tokens, -1, 1), ms.int32), Tensor(loss_mask)


def run(cfg):
    """(loss, logits [b, s, v/tp], {name: (param, grad)}) of a freshly built model."""
    tp.model_parallel_seed(SEED)
    model = GPTModel(cfg)
    tokens, labels, loss_mask = data(cfg)
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(lambda t, l, m: model(t, labels=l, loss_mask=m), None, params)(
        tokens, labels, loss_mask)
    grads = allreduce_sequence_parallel_grads(params, grads)
    logits = model(tokens)
    return float(loss), logits.asnumpy(), {p.name: (p, g.asnumpy()) for p, g in zip(params, grads)}


def tensor_parallel_checks(name: str) -> dict:
    out = {}
    ps.initialize_model_parallel()
    ref_loss, ref_logits, ref = run(make_config(name))
    ps.destroy_model_parallel()
    for sp in (False, True):
        tag = f"{name}/tp2{'_sp' if sp else ''}"
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
        group = ps.get_tensor_model_parallel_group()
        loss, logits, grads = run(make_config(name, sequence_parallel=sp))
        out[f"{tag}/loss"] = rel_err(loss, ref_loss)
        out[f"{tag}/logits"] = rel_err(logits, np.split(ref_logits, group.size, -1)[group.rank])
        assert set(grads) == set(ref), set(grads) ^ set(ref)
        for pname, (param, grad) in grads.items():
            out[f"{tag}/grad/{pname}"] = rel_err(grad, param.shard_spec.shard(ref[pname][1]))
        ps.destroy_model_parallel()
    return out


def pipeline_checks(name: str, tag: str = "pp2", first_stage_layers: int = 1, model=None, **placement) -> dict:
    """Stage 0 (embedding + its layers) hands its output to stage 1 (the other layers + head): same loss.
    `placement` are TransformerConfig's pipeline layout options (first/last stage layers, embedding/loss
    accounting, an explicit layout); `first_stage_layers` is what stage 0 must then hold. `model` overrides
    the named config for both runs."""
    ps.initialize_model_parallel()
    ref_loss, _, _ = run(make_config(name, **(model or {})))
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    cfg = make_config(name, **(model or {}), **placement)
    tp.model_parallel_seed(SEED)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = GPTModel(cfg, pre_process=first, post_process=last)
    tokens, labels, loss_mask = data(cfg)
    peer = ps.get_pipeline_model_parallel_next_rank()
    shape = (cfg.seq_length, 2, cfg.hidden_size)
    out = {}
    layers = len(model.language_model.encoder.layers)
    if first:
        comm.exchange(model(tokens), peer, None)
        out[f"{name}/{tag}/stage_layers"] = float(layers != first_stage_layers)
    else:
        model.set_input_tensor(comm.exchange(None, peer, shape))
        loss = float(model(None, labels=labels, loss_mask=loss_mask))
        out[f"{name}/{tag}/loss"] = rel_err(loss, ref_loss)
        out[f"{name}/{tag}/last_stage_layers"] = float(layers != cfg.num_layers - first_stage_layers)
        if not cfg.untie_embeddings_and_output_weights:  # the head's copy starts as the embedding
            out[f"{name}/{tag}/tied_copy"] = float("word_embeddings_for_head.weight" not in
                                                   {p.name for p in model.trainable_params()})
    ps.destroy_model_parallel()
    return out


def main() -> dict:
    results = {}
    for name in ("gpt2", "llama", "gptoss", "qwen"):
        results.update(tensor_parallel_checks(name))
    for name in ("gpt2", "llama"):
        results.update(pipeline_checks(name))
    # Megatron-Core's placements: an explicit layout with an embedding-only first stage, the loss counted
    # as a layer (3 layers -> 2 + 1), a fixed first-stage share (4 layers -> 1 + 3)
    results.update(pipeline_checks("llama", "pp2_layout", 0, pipeline_model_parallel_layout="E|ttL"))
    results.update(pipeline_checks("options", "pp2_account_loss", 2, account_for_loss_in_pipeline_split=True))
    results.update(pipeline_checks("qwen", "pp2_first1", 1, dict(num_layers=4), num_layers_in_first_pipeline_stage=1))
    return results
