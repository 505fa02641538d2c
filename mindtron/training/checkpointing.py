"""Saving and loading training state in mindtron's checkpoint format.

    <save>/latest_checkpointed_iteration.txt          the newest complete iteration
    <save>/iter_0000100/mp_rank_00/                    one directory per model-parallel rank
        model.safetensors                              this rank's parameters, by name
        optimizer.safetensors                          optimizer state (unless --no-save-optim)
        optimizer_shard_dp000_of_002.safetensors       or, with the distributed optimizer, each data-parallel
                                                       rank's state pieces with their ranges (metadata)
        meta.json                                      iteration, consumed samples, scheduler, loss scaler,
                                                       RNG states, parallel layout, arguments, CRC32 per file,
                                                       the callbacks' state (training/callbacks.py)
    (mp_rank_XX_YYY with pipeline parallelism: XX tensor rank, YYY pipeline rank, as Megatron names them;
    with expert parallelism a further _ZZZ, the expert-parallel rank: each such directory holds the dense
    weights and that rank's experts, as Megatron's torch format does)

Expert weights are stacked per rank ([local experts, ...]); a run may load them at another expert-parallel
size (weights and optimizer state, the distributed optimizer's included), since the directories of all
expert-parallel ranks together hold every expert and their order is Megatron's (expert parallel rank r
holds experts r x E_local ...).

A save is atomic: each rank writes into a temporary directory and renames it when complete, and the
tracker file is replaced (write + rename) only after every rank has finished; a crash mid-save leaves the
previous checkpoint as the latest loadable one. Data-parallel rank 0 of each model-parallel rank writes.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
import mindspore as ms
from mindspore import Tensor

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.training.expert_checkpoint import SavedIteration

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


def iteration_dir(root: str, iteration: int) -> Path:
    """<root>/iter_0000100."""
    return Path(root) / f"iter_{iteration:07d}"


def mp_rank_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Megatron's per-model-parallel-rank directory name."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def _this_rank_dir(root: str, iteration: int) -> Path:
    name = mp_rank_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                        ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_rank(),
                        ps.get_expert_model_parallel_world_size())
    layout = ps.get_layout()
    if layout.etp not in (1, layout.tp):  # experts split differently from dense weights: their shard too
        name += f"_etp{ps.get_expert_tensor_parallel_rank():02d}"
    return iteration_dir(root, iteration) / name


def _writers() -> List[int]:
    """The ranks that write a directory: the lowest rank of each set of ranks holding the same weights
    (equal in dense and in expert coordinates: the intersection of a data-parallel and an expert-data-parallel
    group)."""
    dense, expert = ps.get_all_rank_groups("dp-cp"), ps.get_all_rank_groups("expert-dp")
    return sorted({min(set(a) & set(b)) for a in dense for b in expert if set(a) & set(b)})


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _to_numpy(value) -> np.ndarray:
    array = value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)
    return np.ascontiguousarray(array)


def named_parameters(model) -> Dict[str, Any]:
    """name -> Parameter of a model, or of a list of virtual-stage chunks (names prefixed model0., model1.,
    as Megatron keys chunks)."""
    if isinstance(model, (list, tuple)):
        if len(model) == 1:
            return dict(model[0].parameters_and_names())
        return {f"model{c}.{name}": p for c, m in enumerate(model) for name, p in m.parameters_and_names()}
    return dict(model.parameters_and_names())


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration in <root>/latest_checkpointed_iteration.txt, or None when there is no checkpoint."""
    path = Path(root) / TRACKER
    if not path.exists():
        return None
    text = path.read_text().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} should hold an iteration number, found {text!r}") from None


def save_checkpoint(root: str, iteration: int, model, optimizer=None, scheduler=None, loss_scaler=None,
                    consumed_samples: int = 0, args: Optional[Dict[str, Any]] = None, save_optim: bool = True,
                    save_rng: bool = True, keep_checkpoint_max: Optional[int] = None,
                    callback_states: Optional[Dict[str, Any]] = None) -> Path:
    """Write this rank's part of iteration `iteration` under `root`; every rank must call it.
    `callback_states` (the run's CallbackList.state_dict()) goes into meta.json."""
    from mindtron.parallel_core.optimizer import Float16Optimizer, optimizer_state_dict

    if hasattr(optimizer, "finish_param_sync"):  # weights still waiting for the distributed optimizer's gather
        optimizer.finish_param_sync()
    final = _this_rank_dir(root, iteration)
    # one writer per directory: with experts spread over ep ranks each ep rank writes its own directory
    writers = _writers()
    writer = comm.get_rank() in writers
    sharded = save_optim and hasattr(optimizer, "sharded_state_dict")  # the distributed optimizer
    tmp = final.with_name(final.name + ".tmp")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:  # every data-parallel rank writes its own optimizer shard into the directory
        tensors, ranges = optimizer.sharded_state_dict()
        ranges["__writer__"] = json.dumps({"tp": ps.get_tensor_model_parallel_rank(),
                                           "etp": ps.get_expert_tensor_parallel_rank()})
        comm.barrier()
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        save_file({k: _to_numpy(v) for k, v in tensors.items()}, str(tmp / _shard_name(dp_rank, dp_size)),
                  metadata=ranges)
        comm.barrier()
    if writer:
        files = {"model.safetensors": {name: _to_numpy(p) for name, p in named_parameters(model).items()}}
        if save_optim and optimizer is not None and not sharded:
            state = optimizer.state_dict() if isinstance(optimizer, Float16Optimizer) else optimizer_state_dict(optimizer)
            files["optimizer.safetensors"] = {k: _to_numpy(v) for k, v in state.items()}
        crcs = {}
        for filename, tensors in files.items():
            save_file(tensors, str(tmp / filename))
        for path in sorted(tmp.glob("*.safetensors")):
            crcs[path.name] = _crc(path)
        layout = ps.get_layout()
        meta = {
            "format_version": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "loss_scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
            "rng": _rng_state() if save_rng else None,
            "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep, "dp": layout.dp,
                       "vpp": layout.vpp, "etp": layout.etp, "directories": len(writers)},
            "args": args or {}, "crc32": crcs, "callbacks": callback_states or {},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        _replace_dir(tmp, final)
    comm.barrier()
    if comm.get_rank() == 0:
        tracker = Path(root) / TRACKER
        tmp_tracker = tracker.with_name(TRACKER + ".tmp")
        tmp_tracker.write_text(str(iteration))
        os.replace(tmp_tracker, tracker)
        if keep_checkpoint_max:
            _remove_old(root, keep_checkpoint_max, iteration)
    comm.barrier()
    return final


def _replace_dir(new: Path, final: Path) -> None:
    # Saving an iteration that already exists (a resumed run reaching it again): the old directory is moved
    # aside, not deleted, until the new one is in place.
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _shard_name(dp_rank: int, dp_size: int) -> str:
    return f"optimizer_shard_dp{dp_rank:03d}_of_{dp_size:03d}.safetensors"


def _load_optimizer(directory: Path, optimizer, iteration_path: Path, saved_layout: dict,
                    saved_iteration: Optional[SavedIteration], experts: set) -> None:
    from mindtron.parallel_core.optimizer import Float16Optimizer, load_optimizer_state_dict

    shard_files = sorted(directory.glob("optimizer_shard_dp*_of_*.safetensors"))
    spread = saved_layout.get("ep", 1) > 1 or saved_iteration is not None
    if spread:
        # with experts the data-parallel ranks wrote their shards into the directories of their expert-parallel
        # ranks (every tensor rank of the stage): take them all, the optimizer picks what this rank needs
        stage = SavedIteration(iteration_path, saved_layout).pipeline_dirs()
        shard_files = sorted(f for d in stage for f in d.glob("optimizer_shard_dp*_of_*.safetensors"))
    plain = directory / "optimizer.safetensors"
    if hasattr(optimizer, "load_sharded_state_dicts"):
        if not shard_files:
            raise FileNotFoundError(f"{directory} has no distributed-optimizer shards (saved without "
                                    "--use-distributed-optimizer or with --no-save-optim); pass --no-load-optim")
        sizes = {int(f.name.rsplit("_of_", 1)[1].split(".")[0]) for f in shard_files}
        if not spread and (len(sizes) != 1 or len(shard_files) != sizes.pop()):
            raise FileNotFoundError(f"{directory}: the distributed-optimizer shard files are incomplete "
                                    f"({[f.name for f in shard_files]})")
        shards = []
        for f in shard_files:  # regathered from every saved rank, so any data-parallel size can load
            with safe_open(str(f), framework="numpy") as handle:
                shards.append(({k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}))
        optimizer.load_sharded_state_dicts(shards)
        return
    if not plain.exists():
        hint = (" (it holds distributed-optimizer shards: add --use-distributed-optimizer)" if shard_files
                else " (saved with --no-save-optim?)")
        raise FileNotFoundError(f"{plain} is missing{hint}; or pass --no-load-optim")
    state = load_file(str(plain)) if saved_iteration is None else saved_iteration.read("optimizer.safetensors", experts)
    if isinstance(optimizer, Float16Optimizer):
        optimizer.load_state_dict(state)
    else:
        load_optimizer_state_dict(optimizer, state)


def _is_complete(directory: Path) -> bool:
    """Every model-parallel rank of the iteration finished writing (meta.json in each, none left in .tmp)."""
    ranks = [d for d in directory.iterdir() if d.is_dir() and d.name.startswith("mp_rank_")]
    if not ranks or any(d.suffix in (".tmp", ".old") for d in ranks):
        return False
    try:
        layout = json.loads((ranks[0] / "meta.json").read_text())["layout"]
    except (OSError, ValueError, KeyError):
        return False
    expected = layout.get("directories", layout["tp"] * layout["pp"])
    return len(ranks) == expected and all((d / "meta.json").exists() for d in ranks)


def _remove_old(root: str, keep: int, current: int) -> None:
    """Keep the newest `keep` complete iterations (always `current`, just saved); drop older ones and the
    leftovers of saves that crashed before `current`."""
    found = sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    complete = [i for i in found if i == current or _is_complete(iteration_dir(root, i))]
    kept = set(complete[-keep:]) | {current}
    for old in found:
        if old not in kept and old < current:
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)


def _rng_state() -> dict:
    return {"tracker": tp.get_rng_tracker().get_states(), "numpy": _jsonable(np.random.get_state())}


def _jsonable(state):
    kind, keys, pos, has_gauss, cached = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rng(saved: dict) -> None:
    tp.get_rng_tracker().set_states(saved["tracker"])
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))


def _refuse_megatron_checkpoint(root: str, iteration: int) -> None:
    """A Megatron-LM checkpoint (torch or torch_dist format) given to --load: say how to convert it."""
    folders = [iteration_dir(root, iteration)] + ([Path(root) / "release"] if iteration == 0 else [])
    for folder in folders:
        torch_files = list(folder.glob("mp_rank_*/model_optim_rng.pt"))
        if torch_files or (folder / ".metadata").exists() or list(folder.glob("*.distcp")):
            kind = "torch" if torch_files else "torch_dist"
            layout = ps.get_layout()
            raise ValueError(
                f"{folder} is a Megatron-LM checkpoint ({kind} format); --load reads mindtron checkpoints. Convert "
                f"it once: python -m mindtron.convert --load-dir {root} --save-dir {root}-mindtron "
                f"--target-tensor-parallel-size {layout.tp} --target-pipeline-parallel-size {layout.pp} --verify, "
                f"then pass --load {root}-mindtron (docs/checkpoints.md)")


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, loss_scaler=None,
                    iteration: Optional[int] = None, load_optim: bool = True, load_rng: bool = True,
                    finetune: bool = False, crc_check: bool = False, strict: bool = True,
                    callbacks=None) -> Tuple[int, int]:
    """Restore this rank's state from `root` (the latest iteration unless given).

    Returns (iteration, consumed_samples); (0, 0) with `finetune`, which loads the weights only. `callbacks`
    (a CallbackList) gets the callbacks' saved state back (not with `finetune`).
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist (--load)")
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no {TRACKER} in {root}: nothing was saved there (--load)")
    _refuse_megatron_checkpoint(root, iteration)
    directory = _this_rank_dir(root, iteration)
    saved_iteration = None
    if not (directory / "meta.json").exists():
        # saved with another expert-parallel size? any directory of this tensor and pipeline rank tells
        candidates = sorted(iteration_dir(root, iteration).glob("mp_rank_*/meta.json"))
        if not candidates:
            raise FileNotFoundError(f"{directory / 'meta.json'} is missing: the checkpoint of iteration {iteration} "
                                    "is incomplete or was saved with a different parallel layout")
        saved_iteration = SavedIteration(iteration_dir(root, iteration), json.loads(candidates[0].read_text())["layout"])
        directory = saved_iteration.dense_dir()
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: the checkpoint of iteration {iteration} is incomplete "
                                "or was saved with a different parallel layout")
    meta = json.loads(meta_path.read_text())
    layout, saved = ps.get_layout(), meta["layout"]
    if (saved["tp"], saved["pp"]) != (layout.tp, layout.pp):
        raise ValueError(f"{root} was saved with tensor x pipeline parallel {saved['tp']} x {saved['pp']}, this run "
                         f"uses {layout.tp} x {layout.pp}; reshard it with the convert tool or match the sizes")
    if (saved.get("ep", 1), saved.get("etp", saved["tp"])) != (layout.ep, layout.etp) and saved_iteration is None:
        saved_iteration = SavedIteration(iteration_dir(root, iteration), saved)
    if crc_check:
        for d in ([directory] if saved_iteration is None else list(saved_iteration.dirs.values())):
            for filename, crc in json.loads((d / "meta.json").read_text())["crc32"].items():
                if _crc(d / filename) != crc:
                    raise ValueError(f"CRC mismatch in {d / filename}: the file is corrupt (--resume-crc-check)")
    params = named_parameters(model)
    experts = {name for name, p in params.items() if getattr(p, "allreduce", True) is False}
    if saved_iteration is None:
        weights = load_file(str(directory / "model.safetensors"))
    else:  # experts regathered from the directories of every saved expert-parallel rank
        weights = saved_iteration.read("model.safetensors", experts)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, param in params.items():
        if name in weights:
            if tuple(weights[name].shape) != tuple(param.shape):
                raise ValueError(f"{name}: checkpoint shape {weights[name].shape} != model shape {tuple(param.shape)}")
            # in place: layers compiled with jit_layers keep reading the parameter's buffer
            ms.ops.assign(param, Tensor(weights[name], param.dtype))
    if hasattr(optimizer, "reload_main_params"):  # fp32 main weights follow the loaded ones (until optimizer state)
        optimizer.reload_main_params()
    if finetune:
        return 0, 0
    if callbacks is not None:
        callbacks.load_state_dict(meta.get("callbacks") or {})
    if load_optim and optimizer is not None:
        _load_optimizer(directory, optimizer, iteration_dir(root, iteration), saved, saved_iteration, experts)
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if loss_scaler is not None and meta["loss_scaler"] is not None:
            loss_scaler.load_state_dict(meta["loss_scaler"])
    if load_rng and meta["rng"] is not None:
        _restore_rng(meta["rng"])
    return int(meta["iteration"]), int(meta["consumed_samples"])
