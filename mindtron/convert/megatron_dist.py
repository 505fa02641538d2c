"""Reading a Megatron-LM checkpoint in the `torch_dist` format (Megatron's default `--ckpt-format`) into a
whole model, without PyTorch and without running pickled code.

    <load>/latest_checkpointed_iteration.txt     an iteration number, or "release"
    <load>/iter_0000100/.metadata                 PyTorch Distributed Checkpoint index (dcp_reader)
    <load>/iter_0000100/__0_0.distcp, ...         the data, one file per writing rank
    <load>/iter_0000100/metadata.json             {"sharded_backend": "torch_dist", ...}
    <load>/iter_0000100/common.pt                 Megatron-Core <= 0.18 only: the non-tensor state

The non-tensor state ({"args", "checkpoint_version", "iteration", ...}) is the `common_state` object of the
checkpoint (Megatron-Core 0.19) or `common.pt`. The tensors are global, whatever the tensor, pipeline or
expert parallel layout that wrote them, and stacked over layers (`names_dist`): each is unstacked into
per-layer Megatron-Core keys and mapped to canonical names by `names_core` (experts by their global index),
so the result can be written for any target layout.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from mindtron.convert import names as N
from mindtron.convert import names_core, names_dist
from mindtron.convert.dcp_reader import METADATA_FILE, DcpCheckpoint
from mindtron.convert.model_state import FullCheckpoint, observe_shapes, validate
from mindtron.convert.qkv_order import check_version
from mindtron.convert.report import ConversionReport
from mindtron.progress import Progress
from mindtron.convert.safe_pickle import CheckpointFormatError
from mindtron.convert.spec import megatron_args_dict, spec_from_megatron_args
from mindtron.convert.torch_reader import load_torch_file

CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
COMMON_KEY = "common_state"
FORMAT = "megatron-torch-dist"
_METADATA_KEYS = ("args", "checkpoint_version", "iteration")
# Top-level parts of a Megatron checkpoint that are not model weights (listed as not converted).
_NOT_MODEL = re.compile(r"^(optimizer|rng_state|rerun_state_machine|opt_param_scheduler|dataloader_state)([./]|$)")
_EXTRA_STATE = re.compile(r"\._extra_state(/|$)")


def is_dist_checkpoint(directory) -> bool:
    """Whether the iteration directory `directory` holds a distributed checkpoint (torch_dist or other DCP)."""
    directory = Path(directory)
    return (directory / METADATA_FILE).exists() or (directory / CONFIG_FILE).exists()


def check_backend(directory: Path) -> None:
    """ValueError unless metadata.json says Megatron's torch_dist backend (and .metadata is there)."""
    config = directory / CONFIG_FILE
    if not config.exists():
        raise ValueError(f"{directory} holds a PyTorch Distributed Checkpoint without Megatron's {CONFIG_FILE} "
                         "(Megatron's --ckpt-format torch_dcp or fsdp_dtensor), which the converter does not read; "
                         "have Megatron-LM re-save it with --ckpt-format torch_dist or torch")
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}); the file is corrupt") from None
    if backend != "torch_dist":
        raise ValueError(f"{config} names the sharded backend {backend!r}; the converter reads Megatron's torch_dist "
                         "(and torch) formats: have Megatron-LM re-save it with --ckpt-convert-format torch_dist")
    if not (directory / METADATA_FILE).exists():
        raise FileNotFoundError(f"{directory / METADATA_FILE} is missing: the torch_dist checkpoint is incomplete")


def common_state(ckpt: DcpCheckpoint, reader: str) -> Dict[str, Any]:
    """Megatron's non-tensor state: `common.pt` (Megatron-Core <= 0.18) or the `common_state` object (0.19)."""
    legacy = ckpt.directory / COMMON_FILE
    if legacy.exists():
        state, placeholders = load_torch_file(legacy, reader)
        for source, count in placeholders.items():
            ckpt.placeholders[source] = ckpt.placeholders.get(source, 0) + count
        where = str(legacy)
    else:
        keys = [k for k in ckpt.objects if k.split("/")[0] == COMMON_KEY]
        if not keys:
            return {}
        state, where = ckpt.read_object(keys[0]), f"{ckpt.directory} ({keys[0]})"
        if isinstance(state, list) and len(state) == 1:  # Megatron saves a ShardedObject's data as [data]
            state = state[0]
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} holds a {type(state).__name__}, not Megatron's dict of arguments and iteration")
    return dict(state)


def _describe(ckpt: DcpCheckpoint, keys: List[str]) -> str:
    return ", ".join(f"{k} {list(ckpt.tensors[k].shape)}" for k in keys[:6]) + (" ..." if len(keys) > 6 else "")


def model_keys(ckpt: DcpCheckpoint, report: ConversionReport) -> List[str]:
    """The checkpoint's tensors that are model weights; the rest is recorded in `report`. A tensor with no
    canonical name is an error naming it (decided from the index alone)."""
    keys, unknown = [], []
    for key in sorted(ckpt.tensors):
        if _NOT_MODEL.match(key):
            report.not_converted.append(key.split(".")[0].split("/")[0])
            continue
        per_layer = names_dist.layer_key(key, 0)
        if names_core.canonical_name(per_layer, tied=False) is not None:
            keys.append(key)
        else:
            unknown.append(key)
    for key in ckpt.objects:
        if _EXTRA_STATE.search(key):
            report.ignore("Transformer Engine FP8 metadata (_extra_state)", key)
        elif key.split("/")[0] != COMMON_KEY:
            report.not_converted.append(key.split("/")[0])
    if unknown:
        raise ValueError(f"{ckpt.directory}: cannot place {len(unknown)} tensor(s) ({_describe(ckpt, unknown)}): "
                         "they match no parameter of mindtron's GPT in Megatron-Core's naming scheme. The checkpoint "
                         "may use a feature mindtron does not implement (QK layer norm, multi-latent attention, "
                         "multi-token prediction, ...) or another model family")
    return keys


def read_model_tensors(ckpt: DcpCheckpoint, keys: List[str], progress: Optional[Progress] = None
                       ) -> Dict[str, np.ndarray]:
    """Per-layer (per-expert) Megatron-Core key -> tensor for the torch_dist tensors `keys`; stacked tensors
    give the layers their chunks cover."""
    out: Dict[str, np.ndarray] = {}
    for key in keys:
        tensor = ckpt.read_tensor(key)
        covered = ckpt.covered(key)
        if not names_dist.is_stacked(key) and not covered.all():
            raise CheckpointFormatError(f"{ckpt.directory}: the chunks of {key} {list(tensor.shape)} leave rows "
                                        f"{np.flatnonzero(~covered)[:8].tolist()} out; the checkpoint is incomplete")
        out.update(names_dist.unstack(key, tensor, np.flatnonzero(covered)))
        if progress is not None:
            progress.step(key)
    return out


def read_megatron_dist_checkpoint(directory: Path, number: int, release: bool, load_dir,
                                  overrides: Mapping[str, Any], report: ConversionReport, source_format: str = "auto",
                                  reader: str = "auto", show_progress: bool = True) -> FullCheckpoint:
    """The whole model of the torch_dist checkpoint in iteration directory `directory`."""
    if source_format not in ("auto", "megatron-core", FORMAT):
        raise ValueError(f"{directory} is a torch_dist checkpoint, which holds Megatron-Core names, not "
                         f"--source-format {source_format}")
    check_backend(directory)
    ckpt = DcpCheckpoint(directory, "python" if reader == "auto" else reader)
    state = common_state(ckpt, ckpt.reader)
    args = megatron_args_dict(state.get("args"), str(directory))
    if not args and not overrides:
        raise ValueError(f"{directory} stores no arguments (no {COMMON_KEY} object or {COMMON_FILE}); give the model "
                         "settings on the command line (--num-layers, --hidden-size, --num-attention-heads, ...)")
    report.source, report.source_format, report.iteration = str(load_dir), FORMAT, number
    report.files_read = len({c.file for t in ckpt.tensors.values() for c in t.chunks} |
                            {o.file for o in ckpt.objects.values()})
    report.checkpoint_version = check_version(state.get("checkpoint_version", 3.0), str(directory))
    report.not_converted.extend(str(k) for k in state if str(k) not in _METADATA_KEYS)
    if not release and state.get("iteration") is not None:
        report.iteration = number = int(state["iteration"])
    keys = model_keys(ckpt, report)
    spec = spec_from_megatron_args(args, overrides)
    tp = int(args.get("tensor_model_parallel_size") or 1)
    pp = int(args.get("pipeline_model_parallel_size") or 1)
    vpp = args.get("virtual_pipeline_model_parallel_size")
    report.source_layout = (tp, pp, int(vpp) if vpp else 1)
    if spec.num_experts:
        report.source_experts = (int(args.get("expert_model_parallel_size") or 1),
                                 int(args.get("expert_tensor_parallel_size") or tp))
    progress = Progress(len(keys), "reading", show_progress, unit="tensors")
    pieces: Dict[str, np.ndarray] = {}
    origin: Dict[str, str] = {}
    for key, tensor in read_model_tensors(ckpt, keys, progress).items():
        name = names_core.canonical_name(key, tied=False)
        pieces[name], origin[name] = tensor, key
    # every expert of the model is here, under its global index: one expert-parallel rank holding them all
    full = N.stack_expert_pieces(pieces, spec.num_experts or 0, str(directory), origin)
    report.placed += len(keys)
    for source, count in ckpt.placeholders.items():
        report.placeholders[source] = report.placeholders.get(source, 0) + count
    observe_shapes(spec, full, str(directory))
    validate(full, spec, str(directory))
    return FullCheckpoint(spec, full, number, int(args.get("consumed_train_samples") or 0))
