"""One conversion: read any supported checkpoint into a whole model, write it for the target layout and
format, and (with verify) check the result's logits against the source weights.

    from mindtron.convert import convert_checkpoint
    report = convert_checkpoint("megatron_ckpt", "mindtron_ckpt", target_tp=2, target_pp=1, verify=True)
    print(report.summary())
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from mindtron.convert import names as N

from mindtron.convert.megatron_dist import FORMAT as DIST_FORMAT
from mindtron.convert.megatron_dist_writer import write_megatron_dist_checkpoint
from mindtron.convert.megatron_source import FORMATS as MEGATRON_FORMATS
from mindtron.convert.megatron_source import read_megatron_checkpoint
from mindtron.convert.megatron_writer import write_megatron_checkpoint
from mindtron.convert.mindtron_format import is_mindtron_checkpoint, read_mindtron_checkpoint, write_mindtron_checkpoint
from mindtron.convert.model_state import FullCheckpoint
from mindtron.convert.report import ConversionReport
from mindtron.convert.verify import verify_logits

SOURCE_FORMATS = ("auto", "megatron-legacy", "megatron-core", DIST_FORMAT, "mindtron")
TARGET_FORMATS = ("mindtron", "megatron-legacy", "megatron-core", DIST_FORMAT)


def read_checkpoint(load_dir, source_format: str = "auto", overrides: Optional[Mapping[str, Any]] = None,
                    iteration: Optional[int] = None, reader: str = "auto", report: Optional[ConversionReport] = None,
                    show_progress: bool = False) -> FullCheckpoint:
    """The whole model held by a Megatron-LM or mindtron checkpoint directory (any parallel layout)."""
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"--source-format {source_format!r}: use one of {', '.join(SOURCE_FORMATS)}")
    report = report if report is not None else ConversionReport()
    overrides = dict(overrides or {})
    if source_format == "mindtron" or (source_format == "auto" and is_mindtron_checkpoint(load_dir)):
        return read_mindtron_checkpoint(load_dir, overrides, report, iteration, show_progress)
    return read_megatron_checkpoint(load_dir, overrides, report, source_format, iteration, reader, show_progress)


def write_checkpoint(full: FullCheckpoint, save_dir, target_format: str, tp: int, pp: int, report: ConversionReport,
                     num_layer_list: Optional[Sequence[int]] = None, megatron_release: bool = False,
                     show_progress: bool = False, ep: int = 1, etp: Optional[int] = None) -> None:
    """Write a whole model in `target_format` for tensor x pipeline parallel `tp` x `pp`, an MoE model's experts
    over `ep` expert-parallel ranks, each split over `etp` expert tensor-parallel ranks (default tp)."""
    if target_format == "mindtron":
        info = {"format": report.source_format, "path": report.source, "iteration": report.iteration,
                "layout": list(report.source_layout),
                "experts": list(report.source_experts) if report.source_experts else None}
        write_mindtron_checkpoint(full, save_dir, tp, pp, report, num_layer_list, info, show_progress, ep, etp)
    elif target_format in ("megatron-legacy", "megatron-core"):
        if num_layer_list:
            raise ValueError("--target-num-layer-list: Megatron-LM's torch-format checkpoints split layers evenly; "
                             "drop it")
        write_megatron_checkpoint(full, save_dir, tp, pp, report, megatron_release, show_progress, target_format,
                                  ep, etp)
    elif target_format == DIST_FORMAT:
        if num_layer_list:
            raise ValueError("--target-num-layer-list: a torch_dist checkpoint holds the layers of the whole model "
                             "(Megatron lays them out over its pipeline stages when it loads them); drop it")
        write_megatron_dist_checkpoint(full, save_dir, tp, pp, report, megatron_release, show_progress, ep, etp)
    else:
        raise ValueError(f"--target-format {target_format!r}: use one of {', '.join(TARGET_FORMATS)}")


def count_moe_tensors(tensors: Mapping[str, np.ndarray]) -> Dict[str, int]:
    """The MoE parameters of a whole model by kind, for the summary."""
    counts: Dict[str, int] = {}
    for name, tensor in tensors.items():
        parsed = N.layer_of(name)
        if parsed is None:
            continue
        if parsed[1].startswith("mlp.router."):
            kind = "router tensors"
        elif N.is_expert(name):
            kind = f"expert stacks of {tensor.shape[0]} experts"
        elif parsed[1].startswith("mlp.shared_experts."):
            kind = "shared-expert tensors"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def convert_checkpoint(load_dir, save_dir, target_tp: int = 1, target_pp: int = 1, source_format: str = "auto",
                       target_format: str = "mindtron", overrides: Optional[Mapping[str, Any]] = None,
                       iteration: Optional[int] = None, verify: bool = False, reader: str = "auto",
                       num_layer_list: Optional[Sequence[int]] = None, megatron_release: bool = False,
                       verify_tolerance: float = 1e-4, show_progress: bool = False, target_ep: int = 1,
                       target_etp: Optional[int] = None) -> ConversionReport:
    """Convert the checkpoint in `load_dir` into `save_dir`; returns what was done (`report.summary()`).
    `target_ep` / `target_etp`: expert parallel and expert tensor parallel sizes of the output (MoE models;
    the latter defaults to `target_tp`, as Megatron's --expert-tensor-parallel-size does)."""
    start = time.time()
    if Path(save_dir).resolve() == Path(load_dir).resolve():
        raise ValueError("--save-dir must differ from --load-dir (the conversion would overwrite its source)")
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"--target-format {target_format!r}: use one of {', '.join(TARGET_FORMATS)}")
    report = ConversionReport()
    full = read_checkpoint(load_dir, source_format, overrides, iteration, reader, report, show_progress)
    report.model = full.spec.describe()
    report.parameters = len(full.tensors)
    report.values = int(sum(t.size for t in full.tensors.values()))
    report.experts = count_moe_tensors(full.tensors)
    write_checkpoint(full, save_dir, target_format, target_tp, target_pp, report, num_layer_list, megatron_release,
                     show_progress, target_ep, target_etp)
    if verify:
        written = read_checkpoint(save_dir, target_format, reader="python")
        try:
            report.verify = verify_logits(full.spec.config(), full.tensors, written.spec.config(), written.tensors,
                                          full.spec.true_vocab_size, tolerance=verify_tolerance)
        except ValueError as e:
            raise ValueError(f"{e}. The files in {save_dir} were written but should not be used") from None
    report.seconds = time.time() - start
    return report


__all__ = ["convert_checkpoint", "read_checkpoint", "write_checkpoint", "SOURCE_FORMATS", "TARGET_FORMATS",
           "MEGATRON_FORMATS"]
