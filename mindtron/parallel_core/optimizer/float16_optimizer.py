"""fp32 main weights for fp16 / bf16 parameters (Megatron's Float16OptimizerWithFloat16Params).

With --fp16 the model's weights are float16. Updating them in place would drop every change smaller than
half a float16 step (about 1e-3 relative), so, as Megatron does, the optimizer keeps an fp32 "main" copy
of each low-precision weight, steps the copies with fp32 gradients and moments, and writes them back
rounded into the model after every step. fp32 weights are their own main copy. Checkpoints store the main
copies ("fp32_main.<name>") beside the moments, so a resumed run continues from the unrounded values.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindtron.parallel_core.optimizer.optimizer import (get_megatron_optimizer, load_optimizer_state_dict,
                                                        optimizer_state_dict, param_is_not_decayed)

MAIN_PREFIX = "fp32_main"
# attributes the norm, the reductions and the weight-decay rule read from a parameter
_FLAGS = ("tensor_model_parallel", "shared_embedding", "shared", "sequence_parallel", "allreduce",
          "is_embedding_or_output_parameter")


def main_copy(param: Parameter, value: Tensor, name: str) -> Parameter:
    """An fp32 Parameter holding `value` that carries `param`'s flags."""
    main = Parameter(value.astype(ms.float32), name=name)
    for flag in _FLAGS:
        if hasattr(param, flag):
            setattr(main, flag, getattr(param, flag))
    return main


def needs_main_copies(params: Sequence[Parameter]) -> bool:
    return any(p.dtype != ms.float32 for p in params)


class Float16Optimizer:
    """Megatron's AdamW / SGD over fp32 main copies of `params`; `optimizer(grads)` steps and writes back."""

    def __init__(self, config, params: Sequence[Parameter]):
        self.params = list(params)
        self.main_params: List[Parameter] = [p if p.dtype == ms.float32 else main_copy(p, p, p.name)
                                             for p in self.params]
        qk_wd = getattr(config, "apply_wd_to_qk_layernorm", False)
        decayed = {id(m): not param_is_not_decayed(p.name, p, qk_wd) for p, m in zip(self.params, self.main_params)}
        self.optimizer = get_megatron_optimizer(config, self.main_params, no_decay=lambda m: not decayed[id(m)])

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def __call__(self, grads: Sequence[Tensor]) -> None:
        """Step the main copies with `grads` (aligned with params, any float dtype), then round them into
        the model's weights (in place: compiled layers keep reading the same buffers)."""
        self.optimizer(ms.mutable(tuple(g.astype(ms.float32) for g in grads)))
        for p, main in zip(self.params, self.main_params):
            if main is not p:
                ops.assign(p, main.astype(p.dtype))

    def reload_main_params(self) -> None:
        """Copy the model's weights into the main copies (after loading weights without optimizer state)."""
        for p, main in zip(self.params, self.main_params):
            if main is not p:
                ops.assign(main, p.astype(ms.float32))

    def state_dict(self) -> Dict[str, np.ndarray]:
        """The inner optimizer's state plus the main copies of the low-precision weights."""
        state = optimizer_state_dict(self.optimizer)
        for p, main in zip(self.params, self.main_params):
            if main is not p:
                state[f"{MAIN_PREFIX}.{p.name}"] = main.asnumpy()
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved; without main copies (a checkpoint of fp32 weights, say) the
        loaded weights are used as they are."""
        state = dict(state)
        for p, main in zip(self.params, self.main_params):
            value = state.pop(f"{MAIN_PREFIX}.{p.name}", None)
            if value is not None and main is not p:
                if tuple(value.shape) != tuple(main.shape):
                    raise ValueError(f"optimizer state {MAIN_PREFIX}.{p.name} has shape {value.shape}, the "
                                     f"parameter has {tuple(main.shape)}")
                ops.assign(main, Tensor(value, ms.float32))
        load_optimizer_state_dict(self.optimizer, state)
