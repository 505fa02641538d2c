"""Callbacks: user code that `train()` runs at fixed points of a run.

    class LossPrinter(Callback):
        def on_train_step_end(self, state):
            state.log(f"iteration {state.iteration}: {state.result.loss:.4f}")

    pretrain(..., callbacks=[LossPrinter()])

or in the YAML file (document 000/001's layout: a `type` and its arguments; `callback:` is read the same):

    callbacks:
      - type: MoEDropRateCallback
        expert_num: 8
        capacity_factor: 1.5
        num_layers: 4
        mtp_depth: 0
      - type: mypackage.callbacks.LossPrinter      # a class of your own, by its import path

Hooks, in the order `train()` calls them; every rank calls every hook (a hook may use collectives), and
each receives one `TrainState`:

    on_train_begin            model built, checkpoint loaded, before the first iteration
    for each iteration:
      on_train_step_begin     state.iteration: iterations done before this one
      (the step, Megatron's log line, TensorBoard scalars)
      on_train_step_end       state.iteration: this iteration (1-based); state.result: its StepResult
                              (losses, grad norm, and in .moe the router statistics of the step)
      (evaluation)
      on_save_checkpoint_begin, on_save_checkpoint_end
                              around every checkpoint save; state.checkpoint_dir: the iteration's directory
    on_train_end              after the last iteration and its final save

Within a hook point callbacks run in list order: the `callbacks:` of the configuration, then those passed
to `pretrain(callbacks=...)`, then the ones mindtron adds for MoE options that ask for them. A callback may
keep state across a resume: what `state_dict()` returns (JSON-serialisable) is written into every
checkpoint's meta.json, and `load_state_dict()` receives it when the run resumes from that checkpoint.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

__all__ = ["Callback", "TrainState", "CallbackList", "register_callback", "build_callback", "build_callbacks",
           "HOOKS", "registered_callbacks"]

HOOKS = ("on_train_begin", "on_train_step_begin", "on_train_step_end", "on_save_checkpoint_begin",
         "on_save_checkpoint_end", "on_train_end")
"""Hook names in the order a run calls them."""


@dataclass
class TrainState:
    """What a hook receives."""

    trainer: Any
    """The Trainer: model (`trainer.model`, `trainer.chunks`), optimizer, scheduler, `history`."""
    config: Any
    """The run's AllConfig."""
    iteration: int
    """Iterations completed (on_train_step_end: the one just trained, 1-based)."""
    consumed_samples: int
    """Training samples consumed so far."""
    result: Any = None
    """on_train_step_end: the iteration's StepResult (loss, grad_norm, skipped, loss_scale, moe, ...)."""
    checkpoint_dir: Optional[str] = None
    """on_save_checkpoint_begin/end: the directory of the iteration being saved."""
    log: Callable[[str], None] = field(default=print, repr=False)
    """Print a line from the rank that prints the log (the last rank), flushed."""


class Callback:
    """Base class: override the hooks you need (see the module docstring for their order)."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first iteration."""

    def on_train_step_begin(self, state: TrainState) -> None:
        """Before each iteration."""

    def on_train_step_end(self, state: TrainState) -> None:
        """After each iteration and its log line."""

    def on_save_checkpoint_begin(self, state: TrainState) -> None:
        """Before a checkpoint is written."""

    def on_save_checkpoint_end(self, state: TrainState) -> None:
        """After a checkpoint is written (on every rank)."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last iteration."""

    def state_dict(self) -> Optional[dict]:
        """State to keep in checkpoints (JSON-serialisable), or None for none."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned, when resuming."""


class CallbackList:
    """A run's callbacks, called in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = []
        for cb in callbacks:
            self.append(cb)

    def append(self, callback: Callback) -> None:
        """Add a callback at the end (anything with some of the hook methods works too)."""
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            raise ValueError(f"{callback!r} is not a callback: it has none of the hooks {', '.join(HOOKS)}")
        self.callbacks.append(callback)

    def find(self, kind: type) -> List[Callback]:
        """The callbacks that are instances of `kind`."""
        return [cb for cb in self.callbacks if isinstance(cb, kind)]

    def call(self, hook: str, state: TrainState) -> None:
        """Run `hook` of every callback, in order."""
        if hook not in HOOKS:
            raise KeyError(f"unknown hook {hook!r}; hooks: {HOOKS}")
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(state)

    def _keys(self) -> List[str]:
        # class name, and #n for the n-th further instance of the same class: stable across a resume
        seen: Dict[str, int] = {}
        keys = []
        for cb in self.callbacks:
            name = type(cb).__name__
            keys.append(name if name not in seen else f"{name}#{seen[name]}")
            seen[name] = seen.get(name, 0) + 1
        return keys

    def state_dict(self) -> Dict[str, dict]:
        """{callback key: state} of the callbacks that keep state."""
        out = {}
        for key, cb in zip(self._keys(), self.callbacks):
            state = cb.state_dict() if hasattr(cb, "state_dict") else None
            if state is not None:
                out[key] = state
        return out

    def load_state_dict(self, states: Dict[str, dict]) -> None:
        """Give each callback the state saved under its key (callbacks without saved state keep theirs)."""
        for key, cb in zip(self._keys(), self.callbacks):
            if key in states and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(states[key])

    def __len__(self) -> int:
        return len(self.callbacks)

    def __iter__(self):
        return iter(self.callbacks)


# --------------------------------------------------------------------------------------------------------
# Building callbacks from configuration
# --------------------------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Callable[..., Callback]] = {}


def register_callback(name: Optional[str] = None):
    """Class decorator: make a callback available to `callbacks:` in YAML under `name` (default: its class
    name)."""
    def add(cls):
        _REGISTRY[name or cls.__name__] = cls
        return cls
    return add


def registered_callbacks() -> Dict[str, Callable[..., Callback]]:
    """Type name -> class (or factory) of every callback YAML can name."""
    _load_builtins()
    return dict(_REGISTRY)


def _load_builtins() -> None:
    import mindtron.training.moe_callbacks  # noqa: F401  (registers the MoE tools)


def _import_type(path: str) -> Callable[..., Callback]:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"callback type {path!r}: cannot import it ({err})") from None


def build_callback(spec: Dict[str, Any]) -> Callback:
    """A callback from a `{type: Name, arg: value, ...}` mapping (a registered name or an import path)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"callbacks: each entry needs a 'type' (and its arguments), got {spec!r}")
    _load_builtins()
    kind = str(spec["type"])
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind in _REGISTRY:
        factory = _REGISTRY[kind]
    elif "." in kind or ":" in kind:
        factory = _import_type(kind)
    else:
        close = difflib.get_close_matches(kind, list(_REGISTRY), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"callbacks: unknown type {kind!r}{hint} (known: {', '.join(sorted(_REGISTRY))}; a class "
                         "of your own is named by its import path, e.g. mypackage.callbacks.MyCallback)")
    try:
        signature = inspect.signature(factory)
        signature.bind(**args)
    except TypeError as err:
        raise ValueError(f"callbacks: {kind}: {err}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    return factory(**args)


def build_callbacks(config, callbacks: Optional[Sequence[Any]] = None) -> CallbackList:
    """The run's callbacks: `config.training_config.callbacks` (YAML / --callbacks), then `callbacks`
    (instances or specs), then those the MoE options ask for (moe_callbacks.default_moe_callbacks)."""
    from mindtron.training.moe_callbacks import default_moe_callbacks

    out = CallbackList()
    for item in list(config.training_config.callbacks or []) + list(callbacks or []):
        out.append(build_callback(item) if isinstance(item, dict) else item)
    for cb in default_moe_callbacks(config, out):
        out.append(cb)
    return out
