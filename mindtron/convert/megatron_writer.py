"""Writing a whole model as a Megatron-LM checkpoint in the torch.save format (written without PyTorch):
the legacy model's nested names, or Megatron-Core's flat names (with Mixture-of-Experts layers).

Each model-parallel rank gets iter_XXXXXXX/mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt holding

    {"args": Namespace(num_layers=..., tensor_model_parallel_size=..., ...), "checkpoint_version": 3.0,
     "iteration": N, "model": <legacy GPTModel state dict (names_legacy) or Megatron-Core's (names_core)>}

With expert parallelism (`_ZZZ`, the expert rank) every file holds its tensor rank's dense weights and its
expert rank's experts as SequentialMLP's `local_experts.I` (global expert ep_rank x E/EP + I), each expert
split over the expert tensor-parallel ranks (the file of tensor rank t holds shard t % etp). The args carry
what Megatron's check_checkpoint_args compares and what --use-checkpoint-args reads. There is no optimizer
or RNG state, so Megatron-LM loads the checkpoint with --finetune (or --no-load-optim --no-load-rng); with
`release=True` it is written as the `release` directory, which Megatron loads without optimizer and RNG
state by itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from mindtron.convert.mindtron_format import replace_iteration_dir, target_tensors, write_tracker
from mindtron.convert.model_state import FullCheckpoint
from mindtron.convert.names_core import core_state
from mindtron.convert.names_legacy import legacy_state
from mindtron.convert.report import ConversionReport
from mindtron.progress import Progress
from mindtron.convert.shards import check_target_layout, plan_stages, split_stage, split_stage_experts, stage_tensors
from mindtron.convert.spec import megatron_args_from_config
from mindtron.convert.torch_writer import write_torch_file

RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
# Stored arguments of the source that describe its own layout, not the written one: dropped.
_SOURCE_LAYOUT_ARGS = {"model_parallel_size", "data_parallel_size", "world_size", "rank", "local_rank",
                       "num_layers_per_virtual_pipeline_stage", "pipeline_model_parallel_split_rank",
                       "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "num_layer_list",
                       "expert_model_parallel_size", "expert_tensor_parallel_size", "context_parallel_size",
                       "true_vocab_size"}
SCHEMES = ("megatron-legacy", "megatron-core")


def megatron_rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron's folder name of one model-parallel rank."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def megatron_args(full: FullCheckpoint, tp: int, pp: int, ckpt_format: str = "torch", mcore: bool = False,
                  ep: int = 1, etp: Optional[int] = None) -> argparse.Namespace:
    """The argument namespace stored in the checkpoint: the legacy model (or with `mcore` a Megatron-Core
    model) in the torch format, or (for `ckpt_format` "torch_dist") a Megatron-Core model saved without
    optimizer and RNG state; `ep` x `etp` the expert layout of an MoE model."""
    spec = full.spec
    rows = spec.vocab_rows_for(tp)
    config = spec.config(rows)
    args = {k: v for k, v in spec.stored_args.items() if isinstance(v, (bool, int, float, str, type(None)))
            and k not in _SOURCE_LAYOUT_ARGS}
    args.update(megatron_args_from_config(config))
    args.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=None, padded_vocab_size=rows,
                make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by,
                iteration=full.iteration, consumed_train_samples=full.consumed_samples, consumed_valid_samples=0,
                skipped_train_samples=0, ckpt_format=ckpt_format, expert_model_parallel_size=ep,
                expert_tensor_parallel_size=tp if etp is None else etp)
    if config.moe_config.enabled:
        args["moe_grouped_gemm"] = False  # the experts are written as SequentialMLP's (see the module docstring)
    if ckpt_format == "torch" and not mcore:
        args.update(use_mcore_models=False, use_legacy_models=True, transformer_impl="local")
    else:  # Megatron-Core; no_save_* tell Megatron's loader not to look for optimizer and RNG state
        args.update(use_mcore_models=True, use_legacy_models=False, no_save_optim=True, no_save_rng=True,
                    transformer_impl=transformer_impl(spec))
    if spec.tokenizer_type is not None:
        args["tokenizer_type"] = spec.tokenizer_type
    return argparse.Namespace(**args)


def transformer_impl(spec) -> str:
    """Megatron-Core's layer implementation for the written names: the source's, else Transformer Engine
    (Megatron's default)."""
    impl = spec.stored_args.get("transformer_impl")
    return impl if impl in ("local", "transformer_engine") else "transformer_engine"


def write_megatron_checkpoint(full: FullCheckpoint, save_dir, tp: int, pp: int, report: ConversionReport,
                              release: bool = False, show_progress: bool = True, scheme: str = "megatron-legacy",
                              ep: int = 1, etp: Optional[int] = None) -> List[Path]:
    """Write `full` as a Megatron-LM checkpoint in the torch format for tensor x pipeline (x expert) parallel
    `tp` x `pp` (x `ep`, experts split over `etp` ranks, default tp) with `scheme`'s names."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown Megatron naming scheme {scheme!r} ({', '.join(SCHEMES)})")
    spec = full.spec
    etp = tp if etp is None else etp
    mcore = scheme == "megatron-core"
    if spec.num_experts and not mcore:
        raise ValueError("Megatron's legacy model has no Mixture-of-Experts layers mindtron could write: use "
                         "--target-format megatron-core (torch format) or megatron-torch-dist")
    check_target_layout(spec.config(), tp, pp, None, ep, etp)
    if tp % etp:
        raise ValueError(f"--target-expert-tensor-parallel-size {etp} must divide --target-tensor-parallel-size {tp} "
                         "in Megatron's torch format (each tensor rank's file holds one expert shard)")
    config = spec.config(spec.vocab_rows_for(tp))
    if not mcore:
        legacy_state(dict.fromkeys(full.tensors))  # every tensor has a place in the legacy model, or an error now
    impl = transformer_impl(spec)
    tensors = target_tensors(full, tp)
    args = megatron_args(full, tp, pp, mcore=mcore, ep=ep, etp=etp)
    if not release and full.iteration < 1:
        release = True  # Megatron's tracker accepts iteration 0 only as "release"
        report.warn("iteration 0 is written as Megatron's release checkpoint (the tracker cannot name iteration 0)")
    iteration = 0 if release else full.iteration
    progress = Progress(tp * pp * ep, "writing", show_progress, unit="files")
    written: List[Path] = []

    def build(tmp: Path) -> None:
        for plan in plan_stages(config.num_layers, pp):
            stage = stage_tensors(tensors, plan, spec.untied, pp)
            dense = split_stage(stage, tp, spec.gated)
            experts = split_stage_experts(stage, ep, etp, spec.gated)
            for tp_rank in range(tp):
                for ep_rank in range(ep):
                    weights = {**dense[tp_rank], **experts[(ep_rank, tp_rank % etp)]}
                    model = core_state(weights, impl == "transformer_engine") if mcore else legacy_state(weights)
                    name = megatron_rank_dir(tp_rank, plan.rank, pp, ep_rank, ep)
                    (tmp / name).mkdir()
                    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                             "model": model}
                    write_torch_file(state, tmp / name / RANK_FILE, archive_name="model_optim_rng")
                    written.append(Path(name) / RANK_FILE)
                    progress.step(name, tensors=len(weights))

    root = Path(save_dir)
    final = replace_iteration_dir(root, "release" if release else f"iter_{iteration:07d}", build)
    write_tracker(root, "release" if release else str(iteration))
    report.target, report.target_format, report.target_layout = str(root), scheme, (tp, pp)
    if spec.num_experts:
        report.target_experts = (ep, etp)
    report.vocab_rows = (spec.source_vocab_rows, config.vocab_size)
    report.written = [str(final / w) for w in written]
    return [final / w for w in written]
