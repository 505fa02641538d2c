"""Document 000's ColdHotExpertMonitor: re-choose each MoE layer's hot experts from the measured load.

Every `update_step` iterations (moe_config.update_step, --hot-expert-update-step) the monitor makes the
`hot_expert_num` experts with the most routed pairs since the previous choice the layer's hot experts
(parallel_core/moe/hot_experts.py). The counts are the step's router statistics, summed over all ranks, so
every rank chooses alike without communicating. Nothing else moves: hot experts' replicas are exchanged from
their owners at each forward, so the next step simply uses the new ones, and checkpoints hold the owners'
weights, which are always current. The chosen experts and the counts since the last choice are the
monitor's state, written into every checkpoint and restored on resume, so a resumed run chooses exactly as
the uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mindtron.parallel_core import parallel_state as ps
from mindtron.training.callbacks import Callback, TrainState, register_callback


def moe_layers(chunks, module_name: Optional[str] = None) -> list:
    """The MoE layers (MoELayer cells) of the model chunks, or of the cell at the dotted `module_name` in them
    (e.g. "language_model.encoder.layers"; a number indexes a cell list)."""
    from mindtron.parallel_core.moe import MoELayer

    roots = list(chunks)
    if module_name is not None:
        roots = [cell for cell in (_cell_at(chunk, module_name) for chunk in chunks) if cell is not None]
        if not roots:
            raise ValueError(f"moe_module_name {module_name!r} (--moe-module-name) is not a cell of the model; "
                             "the GPT model's layers are at 'language_model.encoder.layers'")
    layers = [cell for root in roots for _, cell in root.cells_and_names() if isinstance(cell, MoELayer)]
    if module_name is not None and not layers and ps.get_pipeline_model_parallel_world_size() == 1:
        raise ValueError(f"moe_module_name {module_name!r} (--moe-module-name) holds no MoE layer")
    return layers


def _cell_at(cell, path: str):
    for part in path.split("."):
        if part.isdigit():
            try:
                cell = cell[int(part)]
            except (IndexError, TypeError, KeyError):
                return None
        else:
            cell = getattr(cell, part, None)
        if cell is None:
            return None
    return cell


@register_callback()
class ColdHotExpertMonitor(Callback):
    """Re-chooses the hot experts of the MoE layers every update_step iterations (see the module docstring).

    Arguments are document 000's. `moe_config` (a MoEConfig, a mapping of its fields or of document 000's
    keys, or None for the run's) supplies update_step (hot_expert_update_step) and moe_module_name; its
    hot_expert_num and expert count must be the run's. hidden_size, ffn_hidden_size, expert_parallel and
    model_parallel, when given, are checked against the run (the model is built from the run's settings).
    save_checkpoint_steps is accepted: checkpoints never need the monitor's help here.
    After each step `choices` lists (iteration, layer number, old hot experts, new hot experts).
    """

    def __init__(self, moe_config: Any = None, hidden_size: Optional[int] = None,
                 ffn_hidden_size: Optional[int] = None, expert_parallel: Optional[int] = None,
                 model_parallel: Optional[int] = None, save_checkpoint_steps: Optional[int] = None):
        self.moe_config, self.hidden_size, self.ffn_hidden_size = moe_config, hidden_size, ffn_hidden_size
        self.expert_parallel, self.model_parallel = expert_parallel, model_parallel
        self.save_checkpoint_steps = save_checkpoint_steps
        self.update_step: int = 0
        self.layers: Dict[int, Any] = {}          # global 0-based layer index -> this rank's MoELayer
        self.window: Dict[int, np.ndarray] = {}   # routed pairs per expert since the last choice
        self.choices: List[Tuple[int, int, List[int], List[int]]] = []
        self._pending: Optional[dict] = None

    # ---- settings --------------------------------------------------------------------------------------
    def _setting(self, name: str, yaml_name: str, default):
        source = self.moe_config
        if source is None:
            return default
        if isinstance(source, dict):
            return source.get(name, source.get(yaml_name, default))
        return getattr(source, name, default)

    def _check(self, state: TrainState):
        model, parallel = state.config.model_config, state.config.parallel_config
        moe = model.moe_config
        if not moe.enabled or not moe.enable_cold_hot_expert:
            raise ValueError("ColdHotExpertMonitor needs hot experts: set --enable-cold-hot-expert and "
                             "--hot-expert-num (moe_config.enable_cold_hot_expert, hot_expert_num)")
        for name, yaml_name, run in (("hot_expert_num", "hot_expert_num", moe.hot_expert_num),
                                     ("num_experts", "expert_num", moe.num_experts),
                                     ("cold_token_percent", "cold_token_percent", moe.cold_token_percent)):
            given = self._setting(name, yaml_name, run)
            if given is not None and float(given) != float(run):
                raise ValueError(f"ColdHotExpertMonitor: moe_config {yaml_name} {given} but the model was built "
                                 f"with {run}")
        checks = (("hidden_size", self.hidden_size, (model.hidden_size,)),
                  ("ffn_hidden_size", self.ffn_hidden_size, (model.ffn_hidden_size, moe.moe_ffn_hidden_size)),
                  ("expert_parallel", self.expert_parallel, (parallel.expert_model_parallel_size,)),
                  ("model_parallel", self.model_parallel, (parallel.tensor_model_parallel_size,)))
        for name, given, allowed in checks:
            if given is not None and int(given) not in allowed:
                raise ValueError(f"ColdHotExpertMonitor: {name} {given} but the run has {allowed[0]}")
        self.update_step = int(self._setting("hot_expert_update_step", "update_step", moe.hot_expert_update_step))
        if self.update_step < 0:
            raise ValueError(f"ColdHotExpertMonitor: update_step must be >= 0, got {self.update_step}")
        return moe

    # ---- hooks -----------------------------------------------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        moe = self._check(state)
        module_name = self._setting("moe_module_name", "moe_module_name", moe.moe_module_name)
        self.layers = {layer.layer_number - 1: layer for layer in moe_layers(state.trainer.chunks, module_name)}
        if self._pending is not None:
            for key, experts in self._pending.get("hot", {}).items():
                if int(key) in self.layers:
                    self.layers[int(key)].set_hot_experts(experts)
            self.window = {int(k): np.asarray(v, np.int64) for k, v in self._pending.get("window", {}).items()}
            self._pending = None

    def on_train_step_end(self, state: TrainState) -> None:
        stats = state.result.moe if state.result is not None else None
        if stats is None:
            return
        for layer in self.layers:
            if layer in stats.tokens_per_expert:
                counts = np.asarray(stats.tokens_per_expert[layer], np.int64)
                self.window[layer] = self.window.get(layer, 0) + counts
        if self.update_step and state.iteration % self.update_step == 0:
            self._choose(state)

    def _choose(self, state: TrainState) -> None:
        from mindtron.parallel_core.moe.hot_experts import choose_hot_experts

        changed = []
        for layer, cell in sorted(self.layers.items()):
            if layer not in self.window:
                continue
            old = cell.hot_experts.hot.tolist()
            new = choose_hot_experts(self.window[layer], len(old))
            if new != old:
                cell.set_hot_experts(new)
                self.choices.append((state.iteration, layer + 1, old, new))
                changed.append(f"layer {layer + 1}: {old} -> {new}")
        self.window = {}
        if changed and _prints():
            print(f" hot experts at iteration {state.iteration}: " + " | ".join(changed), flush=True)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's layers' hot experts and the routed pairs counted since the last choice."""
        return {"hot": {str(k): cell.hot_experts.hot.tolist() for k, cell in self.layers.items()},
                "window": {str(k): v.tolist() for k, v in self.window.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restored when the layers are known (on_train_begin)."""
        self._pending = state


def _prints() -> bool:
    # one line per pipeline stage: its first tensor-, data- and expert-parallel rank
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            and ps.get_expert_model_parallel_rank() == 0)
