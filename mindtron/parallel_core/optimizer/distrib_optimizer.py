"""Megatron's distributed optimizer (ZeRO-1): optimizer state sharded over data-parallel ranks.

Data-parallel rank r owns elements [r * S, (r + 1) * S) of every gradient bucket (GradBuffer with
`shard=True`). For each parameter overlapping that range it keeps an fp32 "main" copy of the overlapping
piece, and the inner optimizer (Megatron's AdamW / SGD, weight decay decided by the full parameter) holds
moments for those pieces only: per rank about 1/dp of the whole state. A step:

    buckets reduce-scattered -> this rank's gradient pieces -> (unscale, inf check, norm over all ranks,
    clip) -> inner optimizer updates the main pieces -> every bucket's updated range all-gathered back
    into the model parameters.

With `overlap_param_gather` the all-gather is issued at the start of the next forward (`finish_param_sync`)
instead of at the end of the step, as Megatron overlaps it with the next forward; the values are the same.

Checkpoints hold each rank's pieces (fp32 main values and optimizer moments) with their ranges (`sharded_state_dict`); `load_sharded_state_dicts`
takes the pieces saved by every rank of any data-parallel size and cuts this rank's out of them. Ranges of
expert parameters are given in the stack of all experts (expert-parallel rank r's block starts at r x its
size), so the pieces also regather at another expert-parallel size.
"""
from __future__ import annotations

import json
from typing import Dict, List, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core.distributed.param_and_grad_buffer import GradBuffer
from mindtron.parallel_core.optimizer.float16_optimizer import main_copy
from mindtron.parallel_core.optimizer.optimizer import (get_megatron_optimizer, load_optimizer_state_dict,
                                                        optimizer_state_dict, param_is_not_decayed)

_SUFFIX = ".main_shard"
_MAIN = "main"  # checkpoint key prefix of the fp32 main pieces


class DistributedOptimizer:
    """ZeRO-1 over `params` whose gradients flow through `buffer` (built with shard=True)."""

    def __init__(self, config, params: Sequence[Parameter], buffer: GradBuffer, overlap_param_gather: bool = False):
        if not buffer.config.shard:
            raise ValueError("DistributedOptimizer needs a GradBuffer built with shard=True")
        self.params, self.buffer = list(params), buffer
        self.overlap_param_gather = overlap_param_gather
        self.pieces = buffer.shard_pieces()  # (param index, bucket, start, end, start in the shard)
        # Decided together: a rank that raised alone would leave its peers waiting in the next collective.
        empty = comm.all_reduce(Tensor([0.0 if self.pieces else 1.0], ms.float32))
        if float(empty.asnumpy()[0]) > 0:
            raise ValueError(f"{int(float(empty.asnumpy()[0]))} data-parallel rank(s) own no parameter elements: "
                             "the model is smaller than the data-parallel size; drop --use-distributed-optimizer")
        self.main_params: List[Parameter] = []
        decayed = {}
        qk_wd = getattr(config, "apply_wd_to_qk_layernorm", False)
        for i, _, start, end, _ in self.pieces:
            p = self.params[i]
            main = main_copy(p, p.reshape(-1)[start:end], p.name + _SUFFIX)
            decayed[id(main)] = not param_is_not_decayed(p.name, p, qk_wd)
            self.main_params.append(main)
        self.optimizer = get_megatron_optimizer(config, self.main_params,
                                                no_decay=lambda m: not decayed[id(m)])
        self._gather_pending = False

    # The scheduler and the logger read and write these like a plain optimizer's.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    # ---- one step -----------------------------------------------------------------------------------
    def shard_grads(self) -> List[Tensor]:
        """This rank's reduced gradient pieces, aligned with `main_params` (after buffer.finish())."""
        return [b.shard[s0:s0 + (end - start)] for _, b, start, end, s0 in self.pieces]

    def step(self, grads: Sequence[Tensor]) -> None:
        """Update the main pieces with `grads` (from shard_grads, unscaled and clipped), then gather the
        parameters (now, or at the next forward with overlap_param_gather)."""
        self.optimizer(ms.mutable(tuple(g.astype(ms.float32) for g in grads)))
        self._gather_pending = True
        if not self.overlap_param_gather:
            self.finish_param_sync()

    def finish_param_sync(self) -> None:
        """All-gather every bucket's updated range into the model parameters (once per step)."""
        if not self._gather_pending:
            return
        by_bucket: Dict[int, List[Tuple[int, Tensor]]] = {}
        for (i, b, start, end, s0), main in zip(self.pieces, self.main_params):
            by_bucket.setdefault(id(b), []).append((s0, main))
        for b in self.buffer.buckets:
            pieces = sorted(by_bucket.get(id(b), []), key=lambda t: t[0])
            parts, filled = [], 0
            for s0, main in pieces:  # contiguous: pieces of one bucket tile its shard in order
                parts.append(main)
                filled += int(main.shape[0])
            if filled < b.shard_size:
                parts.append(ops.zeros((b.shard_size - filled,), ms.float32))
            shard = ops.concat(parts) if len(parts) > 1 else parts[0]
            full = comm.all_gather(shard, b.group) if b.group.size > 1 else shard
            for i, off in zip(b.indices, b.offsets):
                p = self.params[i]
                n = int(np.prod(p.shape, dtype=np.int64))
                # an in-place write: compiled graphs (TransformerConfig.jit_layers) keep reading the
                # parameter's buffer, and set_data would swap it for a new one they never see
                ops.assign(p, full[off:off + n].reshape(p.shape).astype(p.dtype))
        self._gather_pending = False

    def reload_main_params(self) -> None:
        """Copy the model parameters' pieces into the main pieces (after loading weights into the model)."""
        for (i, _, start, end, _), main in zip(self.pieces, self.main_params):
            ops.assign(main, self.params[i].reshape(-1)[start:end].astype(ms.float32))
        self._gather_pending = False

    def state_numel(self) -> int:
        """Elements of optimizer state on this rank (main pieces and moments)."""
        main = sum(int(m.shape[0]) for m in self.main_params)
        moments = sum(int(np.prod(v.shape)) for k, v in optimizer_state_dict(self.optimizer).items()
                      if not k.startswith("param_groups") and k != "step")
        return main + moments

    # ---- checkpoints --------------------------------------------------------------------------------
    def sharded_state_dict(self) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
        """(tensors, metadata): this rank's state keyed by full parameter names, with each name's range in
        the flattened parameter ("start,end,numel") as metadata."""
        state = optimizer_state_dict(self.optimizer)
        tensors = {k.replace(_SUFFIX, ""): v for k, v in state.items() if not k.startswith("param_groups.")}
        for (i, _, _, _, _), main in zip(self.pieces, self.main_params):
            # the fp32 main pieces: with fp16 parameters they hold bits the model's weights do not
            tensors[f"{_MAIN}.{self.params[i].name}"] = main
        for g, group in enumerate(self.optimizer.param_groups):
            # ranks hold different subsets of the decay / no-decay groups: key them by kind, not position
            for field in ("lr", "weight_decay"):
                tensors[f"param_groups.{_group_kind(group)}.{field}"] = state[f"param_groups.{g}.{field}"]
        ranges = {}
        for i, _, start, end, _ in self.pieces:
            offset, numel = _expert_offset(self.params[i])
            ranges[self.params[i].name] = f"{start + offset},{end + offset},{numel}"
        return tensors, ranges

    def load_sharded_state_dicts(self, shards: Sequence[Tuple[Dict[str, np.ndarray], Dict[str, str]]]) -> None:
        """Restore from the (tensors, ranges) every data-parallel rank saved, whatever their number.

        Shards may come from ranks of other tensor ranks (a "__writer__" entry in the ranges says whose):
        dense pieces are taken from this tensor rank's writers, expert pieces from this expert tensor rank's."""
        from mindtron.parallel_core import parallel_state as ps

        experts = {p.name for p in self.params if _is_expert(p)}
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        etp_rank = ps.get_expert_tensor_parallel_rank() if ps.model_parallel_is_initialized() else 0
        full: Dict[str, np.ndarray] = {}
        covered: Dict[str, np.ndarray] = {}
        scalars: Dict[str, np.ndarray] = {}
        for tensors, ranges in shards:
            writer = json.loads(ranges["__writer__"]) if "__writer__" in ranges else None
            for key, value in tensors.items():
                slot, _, name = key.partition(".")
                if writer is not None and writer["etp" if name in experts else "tp"] != (
                        etp_rank if name in experts else tp_rank):
                    continue  # another tensor rank's shard of this parameter
                if key == "step" or key.startswith("param_groups."):
                    scalars.setdefault(key, value)
                    continue
                if name not in ranges:
                    raise ValueError(f"optimizer shard entry {key!r} has no range in the shard's metadata")
                start, end, numel = (int(x) for x in ranges[name].split(","))
                full.setdefault(key, np.zeros(numel, value.dtype))[start:end] = value.reshape(-1)
                covered.setdefault(key, np.zeros(numel, bool))[start:end] = True
        state: Dict[str, np.ndarray] = {}
        for (i, _, start, end, _), main in zip(self.pieces, self.main_params):
            name = self.params[i].name
            offset, _ = _expert_offset(self.params[i])
            start, end = start + offset, end + offset
            for key in [k for k in full if k.partition(".")[2] == name]:
                if not covered[key][start:end].all():
                    raise ValueError(f"the saved optimizer shards do not cover {key}[{start}:{end}]: a data-parallel "
                                     "rank's optimizer shard file is missing")
                state[key.partition(".")[0] + "." + main.name] = full[key][start:end]
            main_key = f"{_MAIN}.{main.name}"
            if main_key in state:  # older shards without main pieces keep reload_main_params' values
                ops.assign(main, Tensor(state.pop(main_key), ms.float32))
        if "step" in scalars:
            state["step"] = scalars["step"]
        for g, group in enumerate(self.optimizer.param_groups):  # the same on every rank: any shard's will do
            for field in ("lr", "weight_decay"):
                key = f"param_groups.{_group_kind(group)}.{field}"
                if key not in scalars:
                    raise ValueError(f"the saved optimizer shards have no {key!r}")
                state[f"param_groups.{g}.{field}"] = scalars[key]
        load_optimizer_state_dict(self.optimizer, state)


def _is_expert(param: Parameter) -> bool:
    return getattr(param, "allreduce", True) is False


def _expert_offset(param: Parameter) -> Tuple[int, int]:
    """(offset, numel) of a parameter's flattened elements in the stack of every expert-parallel rank's
    (0 and its own numel for dense parameters)."""
    numel = int(np.prod(param.shape))
    spec = getattr(param, "shard_spec", None)
    if not _is_expert(param) or spec is None or spec.expert_world_size == 1:
        return 0, numel
    return spec.expert_rank * numel, numel * spec.expert_world_size


def _group_kind(group: dict) -> str:
    kind = "decay" if group.get("wd_mult", 1.0) else "no_decay"
    return kind + ("_decoupled" if group.get("is_decoupled_lr") else "")
