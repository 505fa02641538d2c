"""Writing a whole model as a Megatron-Core checkpoint in the `torch_dist` format, through PyTorch's own
`torch.distributed.checkpoint` (single process, no process group), so the files are what PyTorch and
Megatron-Core read. PyTorch is needed for this target only.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/.metadata, __0_0.distcp    the global tensors under torch_dist's stacked keys (names_dist)
    <save>/iter_0000100/metadata.json              {"sharded_backend": "torch_dist", "sharded_backend_version": 1}

The `common_state` object holds {"args", "checkpoint_version": 3.0, "iteration",
"num_floating_point_operations_so_far", "content_metadata"} as Megatron-Core 0.19 saves it; `args` records the
target tensor x pipeline layout (which also decides the vocabulary padding) and `no_save_optim` /
`no_save_rng`, so Megatron-LM starts from the weights without looking for optimizer or RNG state. The tensors
themselves are global: Megatron loads them at any layout. Transformer Engine's `_extra_state` objects are
written empty (None, as without FP8), so a Transformer Engine model finds every key it asks for.
Mixture-of-Experts layers hold the router (`mlp.router.weight` [L, E, h], `expert_bias`), the experts stacked by
global index (`mlp.experts.experts.linear_fc1.weight` [L, E, rows, h], SequentialMLP's keys, which
Megatron's grouped experts load too) and the shared expert; with a `--moe-layer-freq` pattern each layer keeps
its own keys (`decoder.layers.{l}.*`, Megatron-Core's non-homogeneous layers).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from mindtron.convert import names as N
from mindtron.convert import names_core, names_dist
from mindtron.convert.megatron_dist import COMMON_KEY, CONFIG_FILE, FORMAT
from mindtron.convert.megatron_writer import CHECKPOINT_VERSION, megatron_args, transformer_impl
from mindtron.convert.mindtron_format import replace_iteration_dir, target_tensors, write_tracker
from mindtron.convert.model_state import FullCheckpoint
from mindtron.convert.report import ConversionReport
from mindtron.progress import Progress
from mindtron.convert.shards import check_target_layout
from mindtron.convert.torch_reader import torch_available

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
# What Megatron-Core 0.19 records about how the sharded state dict was built (no distributed optimizer).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def homogeneous_layers(config) -> bool:
    """Whether Megatron-Core stacks the layers in its sharded state dict: not when `--moe-layer-freq` is a
    list or above 1 (its `non_homogeneous_layers`), whatever the list holds."""
    freq = config.moe_config.moe_layer_freq
    return isinstance(freq, int) and freq <= 1


def dist_state_tensors(full: FullCheckpoint, tp: int) -> Dict[str, np.ndarray]:
    """The model under torch_dist keys (stacked over layers, or per layer with MoE layer patterns),
    vocabulary padded for tensor-parallel `tp`."""
    config = full.spec.config()
    te = transformer_impl(full.spec) == "transformer_engine"
    moe = names_core.moe_layers(full.tensors)
    per_layer = {}
    for name, tensor in target_tensors(full, tp).items():
        layer = N.layer_of(name)
        per_layer[names_core.core_name(name, te, layer is not None and layer[0] in moe)] = tensor
    return names_dist.stack(per_layer, config.num_layers, homogeneous_layers(config))


def write_megatron_dist_checkpoint(full: FullCheckpoint, save_dir, tp: int, pp: int, report: ConversionReport,
                                   release: bool = False, show_progress: bool = True, ep: int = 1,
                                   etp: Optional[int] = None) -> List[Path]:
    """Write `full` as a torch_dist checkpoint whose arguments say tensor x pipeline (x expert) parallel `tp` x
    `pp` (x `ep`, experts split over `etp` ranks); the tensors themselves are global."""
    if not torch_available():
        raise ValueError("--target-format megatron-torch-dist writes through PyTorch's torch.distributed.checkpoint: "
                         "pip install torch (or mindtron[torch]; reading torch_dist checkpoints does not need it)")
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    spec = full.spec
    check_target_layout(spec.config(), tp, pp, None, ep, etp)
    config = spec.config(spec.vocab_rows_for(tp))
    tensors = dist_state_tensors(full, tp)  # a tensor Megatron has no place for is an error before writing
    # plain values: torch.load(weights_only) reads them
    args = megatron_args(full, tp, pp, ckpt_format="torch_dist", ep=ep, etp=etp)
    if not release and full.iteration < 1:
        release = True  # Megatron's tracker accepts iteration 0 only as "release"
        report.warn("iteration 0 is written as Megatron's release checkpoint (the tracker cannot name iteration 0)")
    iteration = 0 if release else full.iteration
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
              "num_floating_point_operations_so_far": 0, "content_metadata": dict(CONTENT_METADATA)}
    state: Dict[str, object] = {key: torch.from_numpy(np.ascontiguousarray(t)) for key, t in tensors.items()}
    state[f"{COMMON_KEY}/shard_0_1"] = [common]  # Megatron stores a ShardedObject's data as [data]
    moe = config.moe_config
    for key in names_dist.extra_state_keys(
            config.num_layers, sorted(names_core.moe_layers(full.tensors)), moe.num_experts or 0,
            bool(moe.moe_shared_expert_intermediate_size), homogeneous_layers(config)):
        state[key] = [None]
    progress = Progress(1, "writing", show_progress)
    name = "release" if release else f"iter_{iteration:07d}"

    def build(tmp: Path) -> None:
        with warnings.catch_warnings():  # "torch.distributed is not initialized": single process, as meant
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp), planner=DefaultSavePlanner(flatten_state_dict=False),
                     no_dist=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(BACKEND))
        progress.step(name)

    root = Path(save_dir)
    final = replace_iteration_dir(root, name, build)
    write_tracker(root, "release" if release else str(iteration))
    report.target, report.target_format, report.target_layout = str(root), FORMAT, (tp, pp)
    if spec.num_experts:
        report.target_experts = (ep, tp if etp is None else etp)
    report.vocab_rows = (spec.source_vocab_rows, config.vocab_size)
    report.written = sorted(str(p) for p in final.iterdir())
    return [Path(p) for p in report.written]


__all__ = ["write_megatron_dist_checkpoint", "dist_state_tensors"]
