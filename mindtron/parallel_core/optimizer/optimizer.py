"""Building Megatron's optimizer (AdamW or SGD with two weight-decay groups) on MindSpore, and its state.

The optimizers are `mindspore.experimental.optim.AdamW` / `SGD` (the ones that run on CPU and match torch),
with two changes made in subclasses:

- gradients are taken in the order of the `params` list given to `get_megatron_optimizer` (the order in
  which `value_and_grad(fn, None, params)` returns them), although the parameters are regrouped into a
  "decay" and a "no decay" group inside the optimizer;
- each step reads `param_group["lr"]` and `param_group["weight_decay"]` as plain floats and hands them to
  the compiled update as tensors. The stock classes pass the weight decay to a `jit` function as a Python
  constant, so every new value (a weight-decay increment schedule changes it each step) recompiled the
  update: about 45x slower per step on CPU.

Applying gradients:

    optimizer = get_megatron_optimizer(config, params)
    loss, grads = ms.value_and_grad(loss_fn, None, params)(...)
    optimizer(tuple(grads))            # one step; grads aligned with `params`

`optimizer.parameters` lists the parameters in group order (decayed first), so take gradients with respect
to `params` (kept as `optimizer.user_params`), not `optimizer.parameters` as MindSpore's own examples do.

Checkpoints: `optimizer_state_dict(opt)` gives a flat {name: numpy array} (moments per parameter name, the
step counter, each group's lr and weight decay); `load_optimizer_state_dict(opt, state)` puts it back
exactly, so a resumed run continues bit for bit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, jit, ops
from mindspore.experimental.optim import SGD, AdamW

from mindtron.parallel_core import cpu_kernels

if TYPE_CHECKING:  # mindtron.training imports this package: a run-time import would be circular
    from mindtron.training.config import OptimizerConfig

__all__ = ["MegatronAdamW", "MegatronSGD", "get_megatron_param_groups", "get_megatron_optimizer",
           "optimizer_state_dict", "load_optimizer_state_dict", "param_is_not_decayed", "param_has_decoupled_lr"]


def param_is_not_decayed(name: str, param: Parameter, apply_wd_to_qk_layernorm: bool = False) -> bool:
    """Megatron's rule: biases and every 1-D parameter (norm weights) get no weight decay; with
    `apply_wd_to_qk_layernorm` (--apply-wd-to-qk-layernorm, Qwen3-Next) the query/key norms do."""
    exempt = name.endswith(".bias") or len(param.shape) == 1
    if apply_wd_to_qk_layernorm and ("q_layernorm." in name or "k_layernorm." in name):
        return False
    return exempt


def param_has_decoupled_lr(param: Parameter) -> bool:
    """Whether --decoupled-lr applies: the word embedding and output-layer weights (Megatron-Core's
    `is_embedding_or_output_parameter`, which GPTModel sets)."""
    return bool(getattr(param, "is_embedding_or_output_parameter", False))


def get_megatron_param_groups(params: Sequence[Parameter], weight_decay: float, lr: float,
                              no_decay: Optional[Callable[[Parameter], bool]] = None,
                              decoupled_lr: Optional[float] = None,
                              decoupled_min_lr: Optional[float] = None) -> List[dict]:
    """The decay group (wd_mult 1.0) and the no-decay group (wd_mult 0.0); empty groups are left out.

    Each group carries Megatron's `wd_mult` and `lr_mult` so the scheduler can set its lr and weight decay.
    `no_decay(param)` replaces Megatron's rule (the distributed optimizer decides by the full parameter).
    With `decoupled_lr` (--decoupled-lr) the embedding and output-layer weights form their own groups whose
    schedule peaks at `decoupled_lr` and ends at `decoupled_min_lr` (--decoupled-min-lr; default: the
    scheduler's --min-lr), after the default groups, as Megatron-Core orders them.
    """
    exempt = no_decay or (lambda p: param_is_not_decayed(p.name, p))
    members: dict = {}
    for p in params:
        decoupled = decoupled_lr is not None and param_has_decoupled_lr(p)
        members.setdefault((decoupled, not exempt(p)), []).append(p)
    groups = []
    for decoupled in (False, True):
        for decayed, wd_mult in ((True, 1.0), (False, 0.0)):
            group_params = members.get((decoupled, decayed))
            if not group_params:
                continue
            group = {"params": group_params, "lr": float(decoupled_lr if decoupled else lr),
                     "weight_decay": float(weight_decay) * wd_mult, "wd_mult": wd_mult, "lr_mult": 1.0,
                     "is_decoupled_lr": decoupled}
            if decoupled:
                group["max_lr"] = float(decoupled_lr)
                if decoupled_min_lr is not None:
                    group["min_lr"] = float(decoupled_min_lr)
            groups.append(group)
    return groups


def _as_float32(value) -> Tensor:
    """A scalar float32 tensor from a float or tensor hyper-parameter (a tensor input never recompiles)."""
    if isinstance(value, Tensor):
        return value.astype(ms.float32)
    return Tensor(float(value), ms.float32)


class _MegatronOrder:
    """Shared behaviour: gradients in the caller's parameter order; lr / weight decay read as floats."""

    def _setup_order(self, user_params: Sequence[Parameter], lrs: Sequence[float]) -> None:
        position = {id(p): i for i, p in enumerate(user_params)}
        # self.parameters is in group order; _order[k] is the caller's index of the k-th of them.
        self._order = tuple(position[id(p)] for p in self.parameters)
        self.user_params = tuple(user_params)
        for group, lr in zip(self.param_groups, lrs):
            # The base class turns lr into a float32 Parameter; keep the exact float, as Megatron's
            # scheduler writes floats here.
            group["lr"] = float(lr)

    def _grads_in_group_order(self, gradients) -> tuple:
        if len(gradients) != len(self._order):
            raise ValueError(f"the optimizer holds {len(self._order)} parameters but got {len(gradients)} "
                             "gradients; pass one gradient per parameter, in the order given to "
                             "get_megatron_optimizer")
        return tuple(gradients[i] for i in self._order)


_adamw_step = ops.MultitypeFuncGraph("mindtron_fused_adamw_step")


@_adamw_step.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Tensor")
def _adamw_step_one(opt, lr, beta1, beta2, eps, weight_decay, grad, param, exp_avg, exp_avg_sq):
    opt(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, grad)
    return True


def fused_adamw_hyperparameters(lr: float, weight_decay: float, beta1: float, beta2: float, eps: float,
                                step: int):
    """(lr', eps', weight_decay') for MindSpore's fused AdamWeightDecay kernel so that it computes Megatron's
    (torch's) bias-corrected AdamW at `step` (counted from 1).

    Megatron: p <- p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / c + eps), with bc1 = 1 - beta1^t, c = sqrt(1 - beta2^t).
    The kernel: p <- p - lr' (m / (sqrt(v) + eps') + wd' p), no bias correction. Since
    m / (sqrt(v) / c + eps) = c m / (sqrt(v) + eps c), lr' = lr c / bc1, eps' = eps c, wd' = lr wd / lr'
    give the same update (equal in exact arithmetic; fp32 rounding differs in the last bits)."""
    bc1 = 1.0 - beta1 ** step
    c = (1.0 - beta2 ** step) ** 0.5
    lr_k = lr * c / bc1
    return lr_k, eps * c, (weight_decay * bc1 / c if lr_k != 0.0 else 0.0)


class MegatronAdamW(_MegatronOrder, AdamW):
    """AdamW (decoupled weight decay, as Megatron's "adam") with Megatron's parameter groups.

    Call with a tuple of gradients aligned with `user_params` (the list it was built from).

    fp32 parameters are updated by a fused kernel: on CPU mindtron's (cpu_kernels.AdamWStep: torch's
    arithmetic, one threaded pass over a whole parameter group, in place; the step about 4x faster than
    MindSpore's kernel there), elsewhere MindSpore's AdamWeightDecay (one op per parameter instead of a
    dozen), its hyper-parameters rescaled each step so that it computes Megatron's bias-corrected AdamW
    (`fused_adamw_hyperparameters`). `fused=False` (or amsgrad, or non-fp32 parameters) uses MindSpore's
    composite AdamW implementation instead.
    """

    def __init__(self, param_groups: List[dict], user_params: Sequence[Parameter], betas, eps: float,
                 fused: bool = True):
        lrs = [g["lr"] for g in param_groups]  # before the base class replaces them
        AdamW.__init__(self, param_groups, lr=lrs[0], betas=tuple(float(b) for b in betas), eps=float(eps),
                       weight_decay=0.0)
        self._setup_order(user_params, lrs)
        self.fused = fused and all(p.dtype == ms.float32 for p in self.parameters)
        self._fused_op = ops.AdamWeightDecay()
        self._cpu_step = cpu_kernels.adamw_step() if self.fused else None

    @jit
    def _fused_group_step(self, lr, beta1, beta2, eps, weight_decay, grads, start, end):
        self.hyper_map(ops.partial(_adamw_step, self._fused_op, lr, beta1, beta2, eps, weight_decay), grads,
                       self.parameters[start:end], self.exp_avg[start:end], self.exp_avg_sq[start:end])
        return True

    def construct(self, gradients):
        gradients = self._grads_in_group_order(gradients)
        self.assignadd(self.state_step, self.increase_tensor)
        if self.fused and not any(g["amsgrad"] or g.get("maximize") for g in self.param_groups):
            step = int(self.state_step.asnumpy())  # the bias corrections need the step on the host
            for group_id, group in enumerate(self.param_groups):
                beta1, beta2 = (float(_group_value(b)) for b in group["betas"])
                lr, wd, eps = (float(_group_value(group[key])) for key in ("lr", "weight_decay", "eps"))
                start, end = self.group_start_id[group_id], self.group_start_id[group_id + 1]
                if self._cpu_step is not None:
                    self._cpu_step.step(self.parameters[start:end], gradients[start:end], self.exp_avg[start:end],
                                        self.exp_avg_sq[start:end], lr, wd, beta1, beta2, eps, step)
                    continue
                lr, eps, wd = fused_adamw_hyperparameters(lr, wd, beta1, beta2, eps, step)
                self._fused_group_step(_as_float32(lr), _as_float32(beta1), _as_float32(beta2), _as_float32(eps),
                                       _as_float32(wd), ms.mutable(gradients[start:end]), start, end)
            return True
        for group_id, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            start, end = self.group_start_id[group_id], self.group_start_id[group_id + 1]
            self.implementation(_as_float32(group["lr"]), _as_float32(group["weight_decay"]), beta1, beta2,
                                group["amsgrad"], group["eps"], ms.mutable(gradients[start:end]), start, end)
        return True


_sgd_step = ops.MultitypeFuncGraph("mindtron_sgd_step")


@_sgd_step.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _sgd_step_one(opt, momentum, lr, weight_decay, grad, param, accum, stat):
    # Megatron's SGD is torch's: L2 decay added to the gradient before the momentum update. It is added
    # here, with a tensor weight decay, so that a changing value does not recompile the update.
    opt(param, grad + param * weight_decay.astype(param.dtype), lr, accum, momentum, stat)
    return True


class MegatronSGD(_MegatronOrder, SGD):
    """SGD with momentum (torch semantics, L2 weight decay) and Megatron's parameter groups.

    Call with a tuple of gradients aligned with `user_params` (the list it was built from).
    """

    def __init__(self, param_groups: List[dict], user_params: Sequence[Parameter], momentum: float):
        lrs = [g["lr"] for g in param_groups]  # before the base class replaces them
        SGD.__init__(self, param_groups, lr=lrs[0], momentum=float(momentum), weight_decay=0.0)
        self._setup_order(user_params, lrs)
        self._sgd = ops.SGD(0.0, 0.0, False)  # dampening 0, decay applied outside, no Nesterov

    @jit
    def _group_step(self, momentum, lr, weight_decay, grads, start, end):
        self.hyper_map(ops.partial(_sgd_step, self._sgd, momentum, lr, weight_decay), grads,
                       self.parameters[start:end], self.accum[start:end], self.stat[start:end])
        return True

    def construct(self, gradients):
        gradients = self._grads_in_group_order(gradients)
        for group_id, group in enumerate(self.param_groups):
            start, end = self.group_start_id[group_id], self.group_start_id[group_id + 1]
            self._group_step(_as_float32(group["momentum"]), _as_float32(group["lr"]),
                             _as_float32(group["weight_decay"]), ms.mutable(gradients[start:end]), start, end)
        return True


def get_megatron_optimizer(config: OptimizerConfig, params: Sequence[Parameter], lr: Optional[float] = None,
                           no_decay: Optional[Callable[[Parameter], bool]] = None):
    """AdamW ("adam") or SGD ("sgd") over `params` with Megatron's decay / no-decay groups (and the
    --decoupled-lr groups of the embedding and output layer).

    `lr` overrides `config.learning_rate` (the scheduler sets it every step anyway); `no_decay` overrides the
    no-weight-decay rule (default: Megatron's, with `config.apply_wd_to_qk_layernorm`). Step it with
    `optimizer(grads)`, a tuple of gradients aligned with `params`.
    """
    params = list(params)
    if not params:
        raise ValueError("get_megatron_optimizer: no parameters to optimize (are all of them frozen?)")
    for p in params:
        if not isinstance(p, Parameter):
            raise ValueError(f"get_megatron_optimizer: params must be mindspore Parameters, got {type(p).__name__}")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("get_megatron_optimizer: a parameter appears twice in params")
    lr = config.learning_rate if lr is None else lr
    if lr is None:
        raise ValueError("no learning rate: set --lr (OptimizerConfig.learning_rate) or pass lr")
    if config.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if no_decay is None:
        qk_wd = getattr(config, "apply_wd_to_qk_layernorm", False)
        no_decay = lambda p: param_is_not_decayed(p.name, p, qk_wd)  # noqa: E731
    decoupled_lr = getattr(config, "decoupled_lr", None)
    if decoupled_lr is not None and decoupled_lr < 0:
        raise ValueError(f"--decoupled-lr must be >= 0, got {decoupled_lr}")
    groups = get_megatron_param_groups(params, config.weight_decay, lr, no_decay, decoupled_lr,
                                       getattr(config, "decoupled_min_lr", None))
    kind = config.optimizer_type.lower()
    if kind in ("adam", "adamw"):
        beta1, beta2 = config.betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"--adam-beta1/--adam-beta2 must be in [0, 1), got {config.betas}")
        if config.eps < 0:
            raise ValueError(f"--adam-eps must be >= 0, got {config.eps}")
        return MegatronAdamW(groups, params, config.betas, config.eps)
    if kind == "sgd":
        if config.sgd_momentum < 0:
            raise ValueError(f"--sgd-momentum must be >= 0, got {config.sgd_momentum}")
        return MegatronSGD(groups, params, config.sgd_momentum)
    raise ValueError(f"--optimizer must be 'adam' or 'sgd', got {config.optimizer_type!r}")


# --------------------------------------------------------------------------------------------------------
# State for checkpoints
# --------------------------------------------------------------------------------------------------------
def _slots(opt) -> Dict[str, tuple]:
    """slot name -> ParameterTuple aligned with opt.parameters."""
    if isinstance(opt, AdamW):
        slots = {"exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}
        if any(g.get("amsgrad") for g in opt.param_groups):
            slots["max_exp_avg_sq"] = opt.max_exp_avg_sq
        return slots
    if isinstance(opt, SGD):
        return {"momentum_buffer": opt.accum, "momentum_stat": opt.stat}
    raise ValueError(f"optimizer_state_dict supports the optimizers of get_megatron_optimizer, "
                     f"got {type(opt).__name__}")


def _param_names(opt) -> List[str]:
    names = [p.name for p in opt.parameters]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"optimizer state is keyed by parameter name, but names repeat: {dup[:5]}; give the "
                         "parameters unique names (parameters of one Cell are named by their path)")
    return names


def optimizer_state_dict(opt) -> Dict[str, np.ndarray]:
    """The optimizer's whole state as numpy arrays keyed "<slot>.<parameter name>", plus "step" (AdamW) and
    "param_groups.<i>.lr" / "param_groups.<i>.weight_decay"."""
    state: Dict[str, np.ndarray] = {}
    names = _param_names(opt)
    for slot, tensors in _slots(opt).items():
        for name, t in zip(names, tensors):
            state[f"{slot}.{name}"] = t.asnumpy().copy()
    if isinstance(opt, AdamW):
        state["step"] = np.asarray(opt.state_step.asnumpy(), np.int32).reshape(())
    for i, group in enumerate(opt.param_groups):
        # float64 keeps the Python floats exact; the step converts them to float32 the same way either way.
        state[f"param_groups.{i}.lr"] = np.asarray(float(_group_value(group["lr"])), np.float64)
        state[f"param_groups.{i}.weight_decay"] = np.asarray(float(_group_value(group["weight_decay"])), np.float64)
    return state


def _group_value(value) -> float:
    return float(value.asnumpy()) if isinstance(value, Tensor) else float(value)


def load_optimizer_state_dict(opt, state: Dict[str, np.ndarray]) -> None:
    """Restore what optimizer_state_dict saved, into an optimizer built over the same parameters.

    Every key must be present with the saved shape; a mismatch raises ValueError naming the entry.
    """
    names = _param_names(opt)
    expected = set()
    for slot, tensors in _slots(opt).items():
        for name, t in zip(names, tensors):
            key = f"{slot}.{name}"
            expected.add(key)
            if key not in state:
                raise ValueError(f"optimizer state has no {key!r}: it was saved for different parameters "
                                 "or another optimizer type (--optimizer); use --no-load-optim to skip it")
            value = np.asarray(state[key])
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"optimizer state {key!r} has shape {value.shape}, the parameter has "
                                 f"{tuple(t.shape)}")
            t.set_data(Tensor(value, t.dtype))
    if isinstance(opt, AdamW):
        expected.add("step")
        if "step" not in state:
            raise ValueError("optimizer state has no 'step' entry (saved from SGD?); use --no-load-optim")
        opt.state_step.set_data(Tensor(np.asarray(state["step"], np.int32).reshape(()), ms.int32))
    for i, group in enumerate(opt.param_groups):
        for field in ("lr", "weight_decay"):
            key = f"param_groups.{i}.{field}"
            expected.add(key)
            if key not in state:
                raise ValueError(f"optimizer state has no {key!r}: it has a different number of parameter groups")
            group[field] = float(np.asarray(state[key]).reshape(()))
    unexpected = sorted(set(state) - expected)
    if any(k.startswith("fp32_main.") for k in unexpected):
        raise ValueError("the optimizer state holds fp32 main copies of fp16/bf16 weights but this run's weights "
                         "are fp32: resume with the checkpoint's --fp16/--bf16, or pass --no-load-optim")
    if unexpected:
        raise ValueError(f"optimizer state has entries for parameters this optimizer does not hold: "
                         f"{unexpected[:5]}")
