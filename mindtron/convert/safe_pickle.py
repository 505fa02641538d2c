"""Unpickling checkpoint data without running any of it.

A pickle rebuilds objects by naming globals (`module.name`) and calling them (REDUCE, NEWOBJ, BUILD). The
`SafeUnpickler` here never calls a global unless it is on a short allow-list of constructors that only build
data: containers (`OrderedDict`, `argparse.Namespace`, `types.SimpleNamespace`), harmless builtins
(`int`, `set`, `slice`, ...), `_codecs.encode` for protocol-2 bytes, torch dtypes and `torch.Size`, plus
what the caller adds (the tensor rebuild functions of a `torch.save` archive). Every other global becomes an
inert `Placeholder` class: "calling" it records the arguments and state (module, name, args, state) and
runs nothing. Megatron's argument namespace is full of such objects: `signal.Signals` members, its own enums
(`megatron.core.enums.ModelType`, `...transformer.enums.AttnBackend`), dataclass-like configs; they load as
placeholders, and `Placeholder.value` gives an enum member's value.

Nothing is executed either way, so the allow-list alone keeps the reader safe. On top of it, a pickle that
names a function of a module that runs programs, touches files or imports code (`os.system`, `subprocess.*`,
`builtins.eval/exec`, `importlib.*`, ...) is refused outright with `UnsafeCheckpointError`: a checkpoint
never needs one, so the file was crafted to run code. Such a module's globals are let through (as
placeholders) only when they are value classes, judged by what they are rather than by name: the module
(standard library only) is imported and the attribute checked to be an Enum class (its call is a member
lookup), a pure path class or a plain namespace. That is how `signal.Signals` passes and `signal.signal`
does not.
"""
from __future__ import annotations

import argparse
import collections
import enum
import importlib
import io
import pathlib
import pickle
import sys
import types
from typing import Any, Callable, Dict, Optional, Tuple


class CheckpointFormatError(ValueError):
    """A checkpoint file is truncated, corrupt or not in a format this reader understands."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle refers to code a checkpoint never needs (a likely malicious payload)."""


class TorchDtype:
    """Stands for a `torch.<name>` dtype object found in a checkpoint (for example `args.params_dtype`)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other) -> bool:
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("torch", self.name))


DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "double", "float", "half", "int64", "int32", "int16",
               "int8", "uint8", "bool", "long", "int", "short", "complex64", "complex128", "float8_e4m3fn",
               "float8_e5m2")
# Modules whose functions run programs, touch files, import code or call arbitrary attributes: a checkpoint
# never calls them, so finding one (other than a value class, see `_is_value_class`) means the file was
# crafted to run code when loaded.
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pickle", "_pickle", "marshal",
    "types", "ctypes", "socket", "pty", "code", "codeop", "webbrowser", "multiprocessing", "operator",
    "_operator", "functools", "signal", "asyncio", "threading", "_thread", "posixpath", "ntpath", "pathlib",
    "tempfile", "urllib", "http", "requests", "inspect", "pydoc", "timeit", "platform", "commands", "popen2",
    "io", "glob", "zipimport", "pkgutil", "ssl", "ftplib", "smtplib", "telnetlib", "bdb", "pdb",
    "trace", "cProfile", "profile", "site", "sysconfig", "distutils", "setuptools", "pip", "ensurepip",
})
SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice, "bytearray": bytearray,
                 "range": range, "int": int, "float": float, "bool": bool, "str": str, "tuple": tuple,
                 "list": list, "dict": dict}


class Placeholder:
    """An object of a class the reader does not load: it keeps the pickle's arguments and state and is never
    anything but data. Subclasses are made per global (`Placeholder.for_global`), so `source` names it."""

    source = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __call__(self, *args, **kwargs):  # a placeholder used as a callable yields another placeholder
        return Placeholder.for_global("<call>", self.source)(*args)

    def __repr__(self) -> str:
        if self.value is not None:
            return f"<not loaded: {self.source}({self.value!r})>"
        return f"<not loaded: {self.source}>"

    @property
    def value(self) -> Any:
        """An enum member's value (a pickled enum member is its class called with the value), else None."""
        if len(self.args) == 1 and self.state is None and isinstance(self.args[0], (int, float, str, bool)):
            return self.args[0]
        return None

    @property
    def fields(self) -> Dict[str, Any]:
        """The attributes the pickle set (a dataclass-like object's fields), {} when it set none."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})  # (__dict__, __slots__ values), as pickle's BUILD takes them
            merged.update(state[1] or {})
            return merged
        return dict(state) if isinstance(state, dict) else {}

    _classes: Dict[Tuple[str, str], type] = {}

    @classmethod
    def for_global(cls, module: str, name: str) -> type:
        """The placeholder class standing for `module.name`."""
        key = (module, name)
        if key not in cls._classes:
            cls._classes[key] = type(f"Placeholder[{module}.{name}]", (Placeholder,), {"source": f"{module}.{name}"})
        return cls._classes[key]


def is_placeholder(obj) -> bool:
    """True for an object standing in for a class the reader did not load."""
    return isinstance(obj, Placeholder)


def plain_value(obj) -> Any:
    """`obj`, or an enum member's value when `obj` is a placeholder for one (real enum members too)."""
    if isinstance(obj, Placeholder) and obj.value is not None:
        return obj.value
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); nothing else is allowed through.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"_codecs.encode called with {type(text).__name__}/{encoding!r}")
    return text.encode(encoding, errors)


def _allowed(module: str, name: str) -> Optional[Any]:
    """The real object for a global on the allow-list (constructors that only build data), else None."""
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if (module, name) == ("argparse", "Namespace"):
        return argparse.Namespace
    if (module, name) == ("types", "SimpleNamespace"):
        return types.SimpleNamespace
    if (module, name) == ("_codecs", "encode"):
        return _codecs_encode
    if module == "torch" and name in DTYPE_NAMES:
        return TorchDtype(name)
    if module == "torch" and name == "Size":
        return tuple
    if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
        return SAFE_BUILTINS[name]
    return None


# Python < 3.10 has no sys.stdlib_module_names: the refused modules that belong to the standard library.
_STDLIB_REFUSED = REFUSED_MODULES - {"requests", "setuptools", "pip", "commands", "popen2"}


def _is_value_class(module: str, name: str) -> bool:
    """Whether the standard-library global `module.name` is a class whose "call" only makes a value: an Enum
    class (a member lookup), a pure path or a plain namespace. Non-standard modules are never imported."""
    root = module.split(".")[0]
    if root not in getattr(sys, "stdlib_module_names", _STDLIB_REFUSED):
        return False
    try:
        obj = importlib.import_module(module)  # a standard-library module: importing it runs nothing of the file's
        for part in name.split("."):
            obj = getattr(obj, part)
    except Exception:  # no such module or attribute (or a platform without it): not a value class
        return False
    return isinstance(obj, type) and (issubclass(obj, (enum.Enum, pathlib.PurePath)) or obj is types.SimpleNamespace)


def is_refused(module: str, name: str) -> bool:
    """Whether a pickle naming `module.name` is refused as a likely attack (see the module docstring)."""
    if module in ("builtins", "__builtin__"):
        return name not in SAFE_BUILTINS  # eval, exec, getattr, __import__, open, compile, ...
    if module.split(".")[0] not in REFUSED_MODULES and module not in REFUSED_MODULES:
        return False
    return not _is_value_class(module, name)


def resolve_global(module: str, name: str, where: str, extra: Optional[Callable[[str, str], Any]] = None) -> Any:
    """What the global `module.name` becomes: an allowed object, an inert Placeholder class, or (for code a
    checkpoint never needs) UnsafeCheckpointError. `extra(module, name)` may allow more (None: not allowed)."""
    allowed = extra(module, name) if extra is not None else None
    if allowed is None:
        allowed = _allowed(module, name)
    if allowed is not None:
        return allowed
    if is_refused(module, name):
        raise UnsafeCheckpointError(
            f"refusing to load {where}: its pickle calls {module}.{name}, which a checkpoint never needs; the file "
            "may be malicious. Nothing from it was executed. Get the checkpoint from a trusted source")
    return Placeholder.for_global(module, name)


class SafeUnpickler(pickle.Unpickler):
    """Unpickles checkpoint data (see the module docstring). `extra(module, name)` allows more globals;
    `persistent(pid)` resolves persistent ids (torch.save's storages); `where` names the data in errors."""

    def __init__(self, file, where: str, extra: Optional[Callable[[str, str], Any]] = None,
                 persistent: Optional[Callable[[Any], Any]] = None):
        super().__init__(file)
        self.where, self.extra, self.persistent = where, extra, persistent
        self.placeholders: Dict[str, int] = {}

    def find_class(self, module: str, name: str):
        found = resolve_global(module, name, self.where, self.extra)
        if isinstance(found, type) and issubclass(found, Placeholder):
            self.placeholders[found.source] = self.placeholders.get(found.source, 0) + 1
        return found

    def persistent_load(self, pid):
        if self.persistent is None:
            raise CheckpointFormatError(f"{self.where}: unexpected persistent id {pid!r} in a plain pickle")
        return self.persistent(pid)


def safe_loads(data: bytes, where: str, extra: Optional[Callable[[str, str], Any]] = None,
               persistent: Optional[Callable[[Any], Any]] = None) -> Tuple[Any, Dict[str, int]]:
    """(object, {placeholder global: count}) of pickled `data`, loaded by SafeUnpickler."""
    unpickler = SafeUnpickler(io.BytesIO(data), where, extra, persistent)
    try:
        obj = unpickler.load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as e:  # malformed pickle stream
        raise CheckpointFormatError(f"{where}: the pickle cannot be read ({type(e).__name__}: {e}); the file is "
                                    "corrupt") from None
    return obj, unpickler.placeholders


def torch_safe_globals(names, where: str) -> list:
    """For PyTorch's `torch.load(weights_only=True)`: the `(object, "module.name")` pairs that make the globals
    `names` (from `torch.serialization.get_unsafe_globals_in_checkpoint`) load as this module loads them,
    allowed objects and inert placeholders; UnsafeCheckpointError for a refused one."""
    pairs = []
    for full in names:
        module, _, name = full.rpartition(".")
        found = resolve_global(module, name, where)
        if isinstance(found, TorchDtype) or found is tuple:
            continue  # torch's own loader resolves torch dtypes and torch.Size itself
        pairs.append((found, full))
    return pairs


__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "TorchDtype", "Placeholder", "SafeUnpickler",
           "safe_loads", "resolve_global", "is_refused", "is_placeholder", "plain_value", "torch_safe_globals"]
