"""Reading a Megatron-LM checkpoint directory (legacy or Megatron-Core model, torch.save format) into a
whole model; a directory in the torch_dist format is handed to `megatron_dist`.

    <load>/latest_checkpointed_iteration.txt            an iteration number, or "release"
    <load>/iter_0000100/mp_rank_00/model_optim_rng.pt  (or release/...), one file per model-parallel rank:
    <load>/iter_0000100/mp_rank_00_001/...              mp_rank_<tensor rank>_<pipeline rank> with pp > 1
    <load>/iter_0000100/mp_rank_00_001_002/...          ..._<expert rank> with expert parallelism (MoE): each
                                                        holds the dense weights and its expert rank's experts

Each file holds {"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model": state dict (or
"model0", "model1", ... per virtual pipeline chunk), "optimizer": ..., "rng_state": ...}. Only the model
entries are converted; the rest is listed in the summary as not converted.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from mindtron.convert import names as N
from mindtron.convert import names_core, names_legacy
from mindtron.convert.megatron_dist import FORMAT as DIST_FORMAT
from mindtron.convert.megatron_dist import is_dist_checkpoint, read_megatron_dist_checkpoint
from mindtron.convert.model_state import FullCheckpoint, ShardState, assemble, observe_shapes, validate
from mindtron.convert.qkv_order import check_version, to_current_order
from mindtron.convert.report import ConversionReport
from mindtron.progress import Progress
from mindtron.convert.spec import ModelSpec, megatron_args_dict, spec_from_megatron_args
from mindtron.convert.torch_reader import is_placeholder, load_torch_file

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?(?:_(\d+))?$")
_METADATA_KEYS = ("args", "checkpoint_version", "iteration")
FORMATS = ("megatron-legacy", "megatron-core", DIST_FORMAT)


def find_checkpoint_dir(load_dir, iteration: Optional[int] = None) -> Tuple[Path, int, bool]:
    """(iteration directory: the mp_rank_* folders or a torch_dist checkpoint, iteration, is release) of a
    Megatron checkpoint."""
    root = Path(load_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--load-dir {root} does not exist")
    if iteration is not None:
        directory = root / f"iter_{iteration:07d}"
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} does not exist (--iteration {iteration})")
        return directory, iteration, False
    tracker = root / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        if text == "release":
            directory, number, release = root / "release", 0, True
        else:
            try:
                number = int(text)
            except ValueError:
                raise ValueError(f"{tracker} should hold an iteration number or 'release', found {text!r}") from None
            directory, release = root / f"iter_{number:07d}", False
        if not directory.is_dir():
            raise FileNotFoundError(f"{tracker} names {directory.name}, which does not exist; pass --iteration N")
        return directory, number, release
    if any(_RANK_DIR.match(p.name) for p in root.iterdir()) or is_dist_checkpoint(root):  # an iteration directory
        match = re.match(r"^iter_(\d+)$", root.name)
        return root, int(match.group(1)) if match else 0, root.name == "release"
    raise FileNotFoundError(f"{root} has no {TRACKER}, no mp_rank_* folders and no .metadata; point --load-dir at "
                            "a Megatron checkpoint directory (or pass --iteration N)")


def rank_dirs(directory: Path) -> Dict[Tuple[int, ...], Path]:
    """The numbers in each `mp_rank_*` folder name -> its model_optim_rng.pt (1 to 3 numbers, by Megatron's
    `mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]`)."""
    files: Dict[Tuple[int, ...], Path] = {}
    for sub in sorted(directory.iterdir()):
        match = _RANK_DIR.match(sub.name)
        if not match or not sub.is_dir():
            continue
        path = sub / RANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
        files[tuple(int(g) for g in match.groups() if g is not None)] = path
    if not files:
        raise FileNotFoundError(f"{directory} holds no mp_rank_*/{RANK_FILE} files")
    if len({len(k) for k in files}) > 1:
        names = sorted(p.parent.name for p in files.values())[:6]
        raise ValueError(f"{directory} mixes rank folder names of different forms ({names}); it holds more than one "
                         "checkpoint layout")
    return files


def rank_files(directory: Path, files: Dict[Tuple[int, ...], Path], args: Mapping[str, Any]
               ) -> Dict[Tuple[int, int, int], Path]:
    """(tensor rank, pipeline rank, expert rank) -> file. Megatron names `mp_rank_XX_YYY` both a pipeline
    rank (pp > 1) and an expert rank (ep > 1, pp = 1): the stored arguments tell which."""
    stored_pp = int(args.get("pipeline_model_parallel_size") or 1)
    stored_ep = int(args.get("expert_model_parallel_size") or 1)
    width = len(next(iter(files)))
    out: Dict[Tuple[int, int, int], Path] = {}
    for numbers, path in files.items():
        if width == 3:
            key = numbers
        elif width == 2 and stored_ep > 1 and stored_pp == 1:
            key = (numbers[0], 0, numbers[1])
        else:
            key = (numbers[0], numbers[1] if width == 2 else 0, 0)
        out[key] = path
    tp, pp, ep = (1 + max(k[i] for k in out) for i in range(3))
    ep = max(ep, stored_ep if width > 1 else 1)  # the last expert ranks' folders may be what is missing
    if width == 2 and stored_ep > 1 and stored_pp > 1:
        raise ValueError(f"{directory}: the stored args say pipeline x expert parallel {stored_pp} x {stored_ep}, but "
                         "the rank folders carry two numbers (mp_rank_XX_YYY), not three (mp_rank_XX_YYY_ZZZ)")
    missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for p in range(pp) for t in range(tp)
               if not any((t, p) == k[:2] for k in out)]
    missing += ["mp_rank_XX" + (f"_{p:03d}" if pp > 1 else "") + f"_{e:03d}" for p in range(pp) for e in range(ep)
                if not any((p, e) == k[1:] for k in out)]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing}: a checkpoint with tensor x pipeline x expert parallel "
                                f"{tp} x {pp} x {ep} needs every rank's folder")
    return out


def _model_chunks(state: Mapping[str, Any], where: Path) -> List[Mapping[str, Any]]:
    if "model" in state:
        return [state["model"]]
    chunks = sorted((int(k[5:]), v) for k, v in state.items() if re.match(r"^model\d+$", str(k)))
    if not chunks:
        raise ValueError(f"{where} holds no 'model' entry (found {sorted(map(str, state))[:8]}); it is not a "
                         "Megatron model checkpoint")
    if [i for i, _ in chunks] != list(range(len(chunks))):
        raise ValueError(f"{where}: virtual pipeline chunks {[i for i, _ in chunks]} are not model0..modelN")
    return [v for _, v in chunks]


def detect_format(model: Mapping[str, Any], where: Path) -> str:
    """'megatron-legacy' or 'megatron-core' from a model state dict's keys."""
    if names_legacy.is_legacy_state(model):
        return "megatron-legacy"
    if names_core.is_core_state(model):
        return "megatron-core"
    raise ValueError(f"{where}: the model's keys ({sorted(map(str, model))[:5]}) are neither Megatron's legacy "
                     "names (language_model.*) nor Megatron-Core's (embedding.*, decoder.*); pass --source-format")


def canonical_tensors(model: Mapping[str, Any], scheme: str, spec: ModelSpec, version: int, tp: int, where: Path,
                      report: ConversionReport, num_local_experts: int = 0) -> Dict[str, np.ndarray]:
    """One model state dict under canonical stage-local names, its routed experts stacked [num_local_experts,
    ...]; every entry placed, ignored, or an error."""
    out: Dict[str, np.ndarray] = {}
    origin: Dict[str, str] = {}
    unknown: List[str] = []
    for key, value in names_legacy.flatten(model).items():
        reason = N.ignore_reason(key)
        if reason is not None:
            report.ignore(reason, key)
            continue
        name = (names_legacy.canonical_name(key) if scheme == "megatron-legacy"
                else names_core.canonical_name(key, tied=not spec.untied))
        if name is None:
            unknown.append(key)
            continue
        if not isinstance(value, np.ndarray):
            what = f"an object of {value.source}" if is_placeholder(value) else type(value).__name__
            raise ValueError(f"{where}: model entry {key} is {what}, not a tensor; the file is corrupt or not a "
                             "Megatron checkpoint")
        if name in out:
            raise ValueError(f"{where}: {key} and {origin[name]} both map to {name}; the checkpoint mixes two "
                             "naming schemes")
        if name.endswith(("query_key_value.weight", "query_key_value.bias")) and version < 2:
            value = to_current_order(value, version, spec.fields["num_attention_heads"] // tp,
                                     spec.fields["kv_channels"])
        if scheme != "megatron-legacy":
            value = names_core.from_grouped_gemm(key, value, max(num_local_experts, 1), spec.fields["hidden_size"],
                                                 str(where))
        out[name], origin[name] = value, key
        report.placed += 1
    if unknown:
        moe = (" Megatron's legacy model's Mixture-of-Experts layers (SwitchMLP) are not converted: only "
               "Megatron-Core's (--use-mcore-models)." if scheme == "megatron-legacy" and spec.num_experts else "")
        raise ValueError(
            f"{where}: cannot place {len(unknown)} tensor(s) {unknown[:6]}: they match no parameter of mindtron's "
            f"GPT in the {scheme} naming scheme.{moe} The checkpoint may use a feature mindtron does not implement "
            "(QK layer norm, multi-latent attention, ...) or another model family; pass --source-format if the "
            "scheme was detected wrongly")
    return N.stack_expert_pieces(out, num_local_experts, str(where), origin)


def read_megatron_checkpoint(load_dir, overrides: Mapping[str, Any], report: ConversionReport,
                             source_format: str = "auto", iteration: Optional[int] = None, reader: str = "auto",
                             show_progress: bool = True) -> FullCheckpoint:
    """The whole model of a Megatron-LM checkpoint, with settings from its stored args and `overrides`."""
    directory, number, release = find_checkpoint_dir(load_dir, iteration)
    if is_dist_checkpoint(directory):
        return read_megatron_dist_checkpoint(directory, number, release, load_dir, overrides, report, source_format,
                                             reader, show_progress)
    if source_format == DIST_FORMAT:
        raise ValueError(f"{directory} is not a torch_dist checkpoint (it has no .metadata); drop --source-format "
                         f"{DIST_FORMAT}")
    found = rank_dirs(directory)
    first = min(found.values(), key=lambda p: p.parent.name)  # mp_rank_00...: holds the stored args
    loaded = {first: _load(first, reader, report)}
    version = check_version(loaded[first].get("checkpoint_version", 0), str(first))
    args = megatron_args_dict(loaded[first].get("args"), str(first))
    if not args and not overrides:
        raise ValueError(f"{first} stores no arguments; give the model settings on the command line "
                         "(--num-layers, --hidden-size, --num-attention-heads, ...)")
    files = rank_files(directory, found, args)
    tp, pp, ep = (1 + max(k[i] for k in files) for i in range(3))
    stored = (args.get("tensor_model_parallel_size", args.get("model_parallel_size")),
              args.get("pipeline_model_parallel_size"), args.get("expert_model_parallel_size"))
    if any(s not in (None, n) for s, n in zip(stored, (tp, pp, ep))):
        report.warn(f"the stored args say TP={stored[0]} x PP={stored[1]} x EP={stored[2]} but {directory} holds "
                    f"{tp} x {pp} x {ep} rank folders; the folders are used")
    spec = spec_from_megatron_args(args, overrides)
    etp = int(args.get("expert_tensor_parallel_size") or tp)
    experts = spec.num_experts or 0
    if experts and (experts % ep or tp % etp):
        raise ValueError(f"{directory}: --num-experts {experts} over {ep} expert-parallel rank folders with tensor "
                         f"parallel {tp} and expert tensor parallel {etp} (stored --expert-tensor-parallel-size) is "
                         "not a layout Megatron writes; check the stored arguments (flags override them)")
    report.checkpoint_version = version
    if not release and loaded[first].get("iteration") is not None:
        report.iteration = number = int(loaded[first]["iteration"])
    consumed = int(args.get("consumed_train_samples") or 0)
    order = sorted(files, key=lambda k: (k[1], k[2], k[0]))
    progress = Progress(len(order), "reading", show_progress, unit="files")
    shards: List[ShardState] = []
    chunks_seen = None
    report.source, report.files_read = str(load_dir), len(order)
    for key in order:
        tp_rank, pp_rank, ep_rank = key
        path = files[key]
        state = loaded.pop(path) if path in loaded else _load(path, reader, report)
        check_version(state.get("checkpoint_version", 0), str(path))
        chunks = _model_chunks(state, path)
        if chunks_seen is None:
            chunks_seen = len(chunks)
        elif len(chunks) != chunks_seen:
            raise ValueError(f"{path} holds {len(chunks)} model chunks, other ranks {chunks_seen}")
        report.not_converted.extend(str(k) for k in state if str(k) not in _METADATA_KEYS
                                    and not re.match(r"^model\d*$", str(k)))
        report.not_converted.extend(p.name for p in path.parent.iterdir() if p.name != RANK_FILE)
        for chunk, model in enumerate(chunks):
            scheme = detect_format(model, path) if source_format == "auto" else source_format
            if source_format != "auto" and detect_format(model, path) != source_format:
                raise ValueError(f"{path} looks like a {detect_format(model, path)} checkpoint, not "
                                 f"--source-format {source_format}")
            if report.source_format and report.source_format != scheme:
                raise ValueError(f"{path} uses {scheme} names but earlier files {report.source_format} names")
            report.source_format = scheme
            tensors = canonical_tensors(model, scheme, spec, version, tp, path, report, experts // ep)
            shards.append(ShardState(tp_rank, chunk * pp + pp_rank, tensors, str(path), ep_rank))
        del state
        progress.step(path.parent.name, tensors=sum(len(s.tensors) for s in shards[-len(chunks):]))
    report.source_layout = (tp, pp, chunks_seen)
    if experts:
        report.source_experts = (ep, etp)
    full = assemble(shards, tp, pp * chunks_seen, spec, report, etp)
    observe_shapes(spec, full, str(directory))
    validate(full, spec, str(directory))
    return FullCheckpoint(spec, full, number, consumed)


def _load(path: Path, reader: str, report: ConversionReport) -> Mapping[str, Any]:
    state, placeholders = load_torch_file(path, reader)
    for source, count in placeholders.items():
        report.placeholders[source] = report.placeholders.get(source, 0) + count
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a Megatron checkpoint dict")
    return state
