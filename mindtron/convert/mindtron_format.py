"""Reading and writing mindtron checkpoints (the format of `mindtron.training.checkpointing`) offline.

    <root>/latest_checkpointed_iteration.txt
    <root>/iter_0000100/mp_rank_00[_000]/model.safetensors   this rank's parameters by GPTModel's names
    <root>/iter_0000100/mp_rank_00[_000]/meta.json           iteration, layout, args (model_config), CRC32s

With expert parallelism (MoE) each folder name ends in the expert-parallel rank (`mp_rank_00[_000]_001`, and
`_etpXX` when the expert tensor-parallel size is neither 1 nor tp): the folder holds its tensor rank's dense
weights and its expert rank's experts, stacked [E / EP, ...]. Written offline, every (tensor, expert) rank pair
gets its folder, so a run at that layout finds its own whatever its rank order.

A written checkpoint holds weights only (no optimizer state, scheduler or RNG state), so training loads it
with --finetune, or with --no-load-optim --no-load-rng to keep the iteration count. The iteration directory
is built under a temporary name and renamed into place, then the tracker file is replaced: an interrupted
conversion leaves any earlier checkpoint in `root` untouched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from mindtron.convert import names as N
from mindtron.convert.model_state import FullCheckpoint, ShardState, assemble, observe_shapes, validate
from mindtron.convert.report import ConversionReport
from mindtron.progress import Progress
from mindtron.convert.shards import (check_target_layout, plan_stages, repad_vocab, split_stage, split_stage_experts,
                                     stage_tensors)
from mindtron.convert.spec import spec_from_mindtron_args
from mindtron.training.checkpointing import FORMAT_VERSION, TRACKER, iteration_dir, mp_rank_name, read_latest_iteration
from mindtron.training.expert_checkpoint import SavedIteration

MODEL_FILE = "model.safetensors"
_CHUNK = re.compile(r"^model(\d+)\.(.+)$")


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes (what meta.json records per file)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def is_mindtron_checkpoint(load_dir) -> bool:
    """Whether `load_dir` looks like a mindtron checkpoint (safetensors + meta.json per rank)."""
    root = Path(load_dir)
    return any(root.glob(f"iter_*/mp_rank_*/{MODEL_FILE}")) or any(root.glob(f"mp_rank_*/{MODEL_FILE}"))


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
def read_mindtron_checkpoint(load_dir, overrides: Mapping[str, Any], report: ConversionReport,
                             iteration: Optional[int] = None, show_progress: bool = True) -> FullCheckpoint:
    """The whole model of a mindtron checkpoint (any tensor x pipeline x virtual layout)."""
    root = Path(load_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--load-dir {root} does not exist")
    if iteration is None:
        iteration = read_latest_iteration(str(root))
        if iteration is None:
            raise FileNotFoundError(f"no {TRACKER} in {root}; pass --iteration N")
    directory = iteration_dir(str(root), iteration)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist (iteration {iteration})")
    metas = sorted(directory.glob("mp_rank_*/meta.json"))
    if not metas:
        raise FileNotFoundError(f"{directory} holds no mp_rank_* folders with a meta.json")
    layout = _read_meta(metas[0]).get("layout") or {}
    saved = SavedIteration(directory, {"tp": 1, "pp": 1, **layout})
    ranks = saved.dirs  # (tp rank, pp rank, ep rank, etp rank of an _etpXX suffix) -> folder
    if not ranks:
        raise FileNotFoundError(f"{directory} holds no mp_rank_* folders of the layout {metas[0]} records")
    tp, pp, ep = (1 + max(k[i] for k in ranks) for i in range(3))
    etp = int(layout.get("etp", tp))
    report.source, report.source_format, report.iteration = str(root), "mindtron", iteration
    report.files_read = len(ranks)
    progress = Progress(len(ranks), "reading", show_progress, unit="files")
    shards: List[ShardState] = []
    spec, consumed, chunks_seen = None, 0, None
    for (tp_rank, pp_rank, ep_rank, etp_rank), sub in sorted(ranks.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                                             kv[0][0], kv[0][3])):
        meta_path, model_path = sub / "meta.json", sub / MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise FileNotFoundError(f"{sub} lacks meta.json or {MODEL_FILE}: the checkpoint is incomplete")
        meta = _read_meta(meta_path)
        saved_crc = (meta.get("crc32") or {}).get(MODEL_FILE)
        if saved_crc is not None and file_crc32(model_path) != saved_crc:
            raise ValueError(f"CRC mismatch in {model_path}: the file is corrupt (copy it again)")
        layout = meta.get("layout") or {}
        if (layout.get("tp", tp), layout.get("pp", pp), layout.get("ep", ep)) != (tp, pp, ep):
            raise ValueError(f"{meta_path} records tensor x pipeline x expert parallel {layout.get('tp')} x "
                             f"{layout.get('pp')} x {layout.get('ep', 1)} but {directory} holds {tp} x {pp} x {ep} "
                             "rank folders")
        if spec is None:
            spec = spec_from_mindtron_args(meta.get("args") or {}, overrides, str(meta_path))
            consumed = int(meta.get("consumed_samples") or 0)
        try:
            weights = load_file(str(model_path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{model_path} cannot be read ({e}); the file is corrupt") from None
        report.not_converted.extend(p.name for p in sub.iterdir() if p.name not in (MODEL_FILE, "meta.json"))
        chunks: Dict[int, Dict[str, np.ndarray]] = {}
        for name, tensor in weights.items():
            match = _CHUNK.match(name)
            chunk, local = (int(match.group(1)), match.group(2)) if match else (0, name)
            if not N.is_canonical(local):
                raise ValueError(f"{model_path}: cannot place tensor {name}: it is not a parameter of mindtron's GPT")
            chunks.setdefault(chunk, {})[local] = tensor
            report.placed += 1
        if chunks_seen is None:
            chunks_seen = len(chunks)
        for chunk, tensors in chunks.items():
            shards.append(ShardState(tp_rank, chunk * pp + pp_rank, tensors, str(model_path), ep_rank,
                                     etp_rank if etp not in (1, tp) else None))
        progress.step(sub.name, tensors=len(weights))
    report.source_layout = (tp, pp, chunks_seen)
    if spec.num_experts:
        report.source_experts = (ep, etp)
    full = assemble(shards, tp, pp * chunks_seen, spec, report, etp)
    observe_shapes(spec, full, str(directory))
    validate(full, spec, str(directory))
    return FullCheckpoint(spec, full, iteration, consumed)


def _read_meta(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from None


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def target_tensors(full: FullCheckpoint, tp: int) -> Dict[str, np.ndarray]:
    """The whole model with its vocabulary tables padded for tensor-parallel size `tp`."""
    rows = full.spec.vocab_rows_for(tp)
    tensors = dict(full.tensors)
    for name in (N.WORD, N.OUTPUT):
        if name in tensors:
            tensors[name] = repad_vocab(tensors[name], rows, full.spec.true_vocab_size, name)
    return tensors


def _write_rank(directory: Path, weights: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    directory.mkdir(parents=True)
    save_file(weights, str(directory / MODEL_FILE))
    meta = {**meta, "crc32": {MODEL_FILE: file_crc32(directory / MODEL_FILE)}}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def replace_iteration_dir(root: Path, iteration_name: str, build) -> Path:
    """Build <root>/<iteration_name> with `build(tmp_dir)` under a temporary name, then swap it in."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / iteration_name
    tmp = root / (iteration_name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root / (iteration_name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_tracker(root: Path, text: str) -> None:
    """Replace <root>/latest_checkpointed_iteration.txt atomically."""
    tmp = root / (TRACKER + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, root / TRACKER)


def write_mindtron_checkpoint(full: FullCheckpoint, save_dir, tp: int, pp: int, report: ConversionReport,
                              num_layer_list: Optional[Sequence[int]] = None, source_info: Optional[dict] = None,
                              show_progress: bool = True, ep: int = 1, etp: Optional[int] = None) -> List[Path]:
    """Write `full` as a mindtron checkpoint for tensor x pipeline parallel `tp` x `pp`, with an MoE model's
    experts spread over `ep` expert-parallel ranks and split over `etp` expert tensor-parallel ranks (default
    tp); returns the files."""
    spec = full.spec
    etp = tp if etp is None else etp
    check_target_layout(spec.config(), tp, pp, num_layer_list, ep, etp)
    config = spec.config(spec.vocab_rows_for(tp), num_layer_list=list(num_layer_list) if num_layer_list else None)
    tensors = target_tensors(full, tp)
    plans = plan_stages(config.num_layers, pp, num_layer_list)
    root = Path(save_dir)
    suffix = etp not in (1, tp)  # checkpointing.py names the expert tensor-parallel shard then (_etpXX)
    folders = [(t, e, r) for t in range(tp) for e in range(ep) for r in (range(etp) if suffix else [t % etp])]
    args = {"model_config": dataclasses.asdict(config),
            "dataset_config": {"tokenizer_type": spec.tokenizer_type},
            "vocabulary": {"true_vocab_size": spec.true_vocab_size,
                           "make_vocab_size_divisible_by": spec.make_vocab_size_divisible_by},
            "converted_from": source_info or {}}
    meta = {"format_version": FORMAT_VERSION, "iteration": full.iteration, "consumed_samples": full.consumed_samples,
            "scheduler": None, "loss_scaler": None, "rng": None,
            "layout": {"tp": tp, "pp": pp, "cp": 1, "ep": ep, "dp": 1, "vpp": None, "etp": etp,
                       "directories": pp * len(folders)}, "args": args}
    progress = Progress(pp * len(folders), "writing", show_progress, unit="files")
    written: List[Path] = []

    def build(tmp: Path) -> None:
        for plan in plans:
            stage = stage_tensors(tensors, plan, spec.untied, pp)
            dense = split_stage(stage, tp, spec.gated)
            experts = split_stage_experts(stage, ep, etp, spec.gated)
            for tp_rank, ep_rank, etp_rank in folders:
                name = mp_rank_name(tp_rank, plan.rank, pp, ep_rank, ep) + (f"_etp{etp_rank:02d}" if suffix else "")
                weights = {**dense[tp_rank], **experts[(ep_rank, etp_rank)]}
                _write_rank(tmp / name, weights, meta)
                written.append(Path(name) / MODEL_FILE)
                progress.step(name, tensors=len(weights))

    iteration_name = iteration_dir(str(root), full.iteration).name
    final = replace_iteration_dir(root, iteration_name, build)
    write_tracker(root, str(full.iteration))
    report.target, report.target_format, report.target_layout = str(root), "mindtron", (tp, pp)
    if spec.num_experts:
        report.target_experts = (ep, etp)
    report.vocab_rows = (spec.source_vocab_rows, config.vocab_size)
    report.written = [str(final / w) for w in written]
    return [final / w for w in written]
