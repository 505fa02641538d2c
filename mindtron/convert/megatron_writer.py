"""Writing a whole model as a Megatron-LM legacy checkpoint (torch.save format, written without PyTorch).

Each model-parallel rank gets iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt holding

    {"args": Namespace(num_layers=..., tensor_model_parallel_size=..., ...), "checkpoint_version": 3.0,
     "iteration": N, "model": <legacy GPTModel state dict, see names_legacy>}

The args carry what Megatron's check_checkpoint_args compares and what --use-checkpoint-args reads. There is
no optimizer or RNG state, so Megatron-LM loads the checkpoint with --finetune (or --no-load-optim
--no-load-rng); with `release=True` it is written as the `release` directory, which Megatron loads without
optimizer and RNG state by itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from mindtron.convert.mindtron_format import replace_iteration_dir, target_tensors, write_tracker
from mindtron.convert.model_state import FullCheckpoint
from mindtron.convert.names_legacy import legacy_state
from mindtron.convert.report import ConversionReport
from mindtron.progress import Progress
from mindtron.convert.shards import check_target_layout, plan_stages, split_stage, stage_tensors
from mindtron.convert.spec import megatron_args_from_config
from mindtron.convert.torch_writer import write_torch_file

RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
# Stored arguments of the source that describe its own layout, not the written one: dropped.
_SOURCE_LAYOUT_ARGS = {"model_parallel_size", "data_parallel_size", "world_size", "rank", "local_rank",
                       "num_layers_per_virtual_pipeline_stage", "pipeline_model_parallel_split_rank",
                       "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "num_layer_list",
                       "expert_model_parallel_size", "context_parallel_size", "true_vocab_size"}


def megatron_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's folder name of one model-parallel rank."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def megatron_args(full: FullCheckpoint, tp: int, pp: int, ckpt_format: str = "torch") -> argparse.Namespace:
    """The argument namespace stored in the checkpoint: the legacy model in the torch format, or (for
    `ckpt_format` "torch_dist") a Megatron-Core model saved without optimizer and RNG state."""
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
                skipped_train_samples=0, ckpt_format=ckpt_format)
    if ckpt_format == "torch":
        args.update(use_mcore_models=False, use_legacy_models=True, transformer_impl="local")
    else:  # Megatron-Core; no_save_* tell Megatron's loader not to look for optimizer and RNG state
        impl = args.get("transformer_impl")
        args.update(use_mcore_models=True, use_legacy_models=False, no_save_optim=True, no_save_rng=True,
                    transformer_impl=impl if impl in ("local", "transformer_engine") else "transformer_engine")
    if spec.tokenizer_type is not None:
        args["tokenizer_type"] = spec.tokenizer_type
    return argparse.Namespace(**args)


def write_megatron_checkpoint(full: FullCheckpoint, save_dir, tp: int, pp: int, report: ConversionReport,
                              release: bool = False, show_progress: bool = True) -> List[Path]:
    """Write `full` as a Megatron-LM legacy checkpoint for tensor x pipeline parallel `tp` x `pp`."""
    spec = full.spec
    check_target_layout(spec.config(), tp, pp, None)
    config = spec.config(spec.vocab_rows_for(tp))
    legacy_state(dict.fromkeys(full.tensors))  # every tensor has a place in the legacy model, or an error now
    tensors = target_tensors(full, tp)
    args = megatron_args(full, tp, pp)
    if not release and full.iteration < 1:
        release = True  # Megatron's tracker accepts iteration 0 only as "release"
        report.warn("iteration 0 is written as Megatron's release checkpoint (the tracker cannot name iteration 0)")
    iteration = 0 if release else full.iteration
    progress = Progress(tp * pp, "writing", show_progress, unit="files")
    written: List[Path] = []

    def build(tmp: Path) -> None:
        for plan in plan_stages(config.num_layers, pp):
            stage = stage_tensors(tensors, plan, spec.untied, pp)
            for tp_rank, weights in enumerate(split_stage(stage, tp, spec.gated)):
                name = megatron_rank_dir(tp_rank, plan.rank, pp)
                (tmp / name).mkdir()
                state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                         "model": legacy_state(weights)}
                write_torch_file(state, tmp / name / RANK_FILE, archive_name="model_optim_rng")
                written.append(Path(name) / RANK_FILE)
                progress.step(name, tensors=len(weights))

    root = Path(save_dir)
    final = replace_iteration_dir(root, "release" if release else f"iter_{iteration:07d}", build)
    write_tracker(root, "release" if release else str(iteration))
    report.target, report.target_format, report.target_layout = str(root), "megatron-legacy", (tp, pp)
    report.vocab_rows = (spec.source_vocab_rows, config.vocab_size)
    report.written = [str(final / w) for w in written]
    return [final / w for w in written]
