"""Reading files written by `torch.save` without PyTorch and without running pickled code.

Since PyTorch 1.6 `torch.save` writes a zip archive (entries stored uncompressed) under one top folder:

    <name>/data.pkl      the pickled object; every tensor names its storage by a persistent id
                         ('storage', <torch.XStorage>, key, location, element count)
    <name>/data/<key>    the raw bytes of each storage, in the byte order of <name>/byteorder (little)
    <name>/version       the serialization version (newer files add .format_version, .storage_alignment, ...)

`read_torch_file` reads the zip directly and unpickles `data.pkl` with `SafeUnpickler`, which resolves only
the globals a checkpoint needs: tensor and parameter rebuild functions (they become numpy arrays), storage
types, torch dtypes (`TorchDtype`), `collections.OrderedDict`, `argparse.Namespace`, `torch.Size` and a
few harmless builtins. Any other class or function becomes an inert `Placeholder` that records its
arguments and never runs. Globals that only an attack would put in a checkpoint (os, subprocess, eval,
exec, ...) make the whole file refused with `UnsafeCheckpointError`, without executing anything.

bfloat16 tensors, which numpy cannot hold, are widened to float32 (exactly). PyTorch's pre-1.6 format
(a bare pickle stream) is not read here; `load_torch_file(..., reader="torch")` reads it when PyTorch is
installed.
"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np


class CheckpointFormatError(ValueError):
    """A checkpoint file is truncated, corrupt or not in a format this reader understands."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle refers to code a checkpoint never needs (a likely malicious payload)."""


# --------------------------------------------------------------------------------------------------------
# What the unpickler may resolve
# --------------------------------------------------------------------------------------------------------
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


class _StorageType:
    """A `torch.XStorage` class: the numpy dtype its bytes hold."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# storage class -> numpy dtype ("bfloat16" is widened to float32 when a tensor is built)
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}
DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "double", "float", "half", "int64", "int32", "int16",
               "int8", "uint8", "bool", "long", "int", "short", "complex64", "complex128", "float8_e4m3fn",
               "float8_e5m2")
# Modules whose functions run programs, touch files, import code or call arbitrary attributes: a checkpoint
# never needs them, so finding one means the file was crafted to run code when loaded.
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
    """An object of a class this reader does not load: it keeps the pickle's arguments and state, and is
    never anything but data. Subclasses are made per global (`Placeholder.for_global`)."""

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
        return f"<not loaded: {self.source}>"

    _classes: Dict[Tuple[str, str], type] = {}

    @classmethod
    def for_global(cls, module: str, name: str) -> type:
        """The placeholder class standing for `module.name`."""
        key = (module, name)
        if key not in cls._classes:
            cls._classes[key] = type(f"Placeholder[{module}.{name}]", (Placeholder,), {"source": f"{module}.{name}"})
        return cls._classes[key]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); nothing else is allowed through.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"_codecs.encode called with {type(text).__name__}/{encoding!r}")
    return text.encode(encoding, errors)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Storage:
    """One storage of the archive, read (and CRC-checked by zipfile) on first use."""

    def __init__(self, reader: "_ArchiveReader", key: str, storage_type: _StorageType, numel: int):
        self.reader, self.key, self.type, self.numel = reader, key, storage_type, int(numel)
        self._array: Optional[np.ndarray] = None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self.reader.read_entry(f"data/{self.key}")
            dtype = np.dtype("uint16" if self.type.dtype == "bfloat16" else self.type.dtype)
            if self.reader.big_endian:
                dtype = dtype.newbyteorder(">")
            need = self.numel * dtype.itemsize
            if len(raw) < need:
                raise CheckpointFormatError(
                    f"{self.reader.path}: storage data/{self.key} holds {len(raw)} bytes but its tensors need {need}; "
                    "the file is truncated or corrupt (copy it again from the source)")
            array = np.frombuffer(raw, dtype, self.numel)
            self._array = array.astype(dtype.newbyteorder("=")) if self.reader.big_endian else array
        return self._array


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
    """A tensor as a contiguous numpy array (torch._utils._rebuild_tensor(_v2)'s arguments)."""
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"a tensor refers to {storage!r} instead of a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    flat = storage.array()
    if any(s == 0 for s in size):
        array = np.zeros(size, flat.dtype)
    else:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if offset < 0 or min(stride, default=0) < 0 or last >= flat.size:
            raise CheckpointFormatError(
                f"{storage.reader.path}: a tensor of shape {list(size)} reaches element {last} of storage "
                f"data/{storage.key}, which has {flat.size}; the file is corrupt")
        item = flat.dtype.itemsize
        array = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(st * item for st in stride))
        array = np.array(array)  # contiguous copy, writable
    return _bf16_to_f32(array) if storage.type.dtype == "bfloat16" else array


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> Any:
    return data


def _resolve_allowed(module: str, name: str) -> Optional[Any]:
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if (module, name) == ("argparse", "Namespace"):
        return argparse.Namespace
    if (module, name) == ("_codecs", "encode"):
        return _codecs_encode
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
        return _StorageType(name, STORAGE_DTYPES[name])
    if module == "torch" and name in DTYPE_NAMES:
        return TorchDtype(name)
    if module == "torch" and name == "Size":
        return tuple
    if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
        return SAFE_BUILTINS[name]
    return None


def _refused(module: str, name: str) -> bool:
    root = module.split(".")[0]
    if module in ("builtins", "__builtin__"):
        return name not in SAFE_BUILTINS  # eval, exec, getattr, __import__, open, compile, ...
    return root in REFUSED_MODULES or module in REFUSED_MODULES


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's data.pkl: allowed globals resolve, dangerous ones are refused, the rest
    become placeholders. Storages are resolved through `reader`."""

    def __init__(self, file, reader: "_ArchiveReader"):
        super().__init__(file)
        self.reader = reader
        self.placeholders: Dict[str, int] = {}

    def find_class(self, module: str, name: str):
        allowed = _resolve_allowed(module, name)
        if allowed is not None:
            return allowed
        if _refused(module, name):
            raise UnsafeCheckpointError(
                f"refusing to load {self.reader.path}: its pickle calls {module}.{name}, which a checkpoint never "
                "needs; the file may be malicious. Nothing from it was executed. Get the checkpoint from a trusted "
                "source")
        source = f"{module}.{name}"
        self.placeholders[source] = self.placeholders.get(source, 0) + 1
        return Placeholder.for_global(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self.reader.path}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self.reader.path}: storage {key} has unknown type {storage_type!r}")
        return self.reader.storage(str(key), storage_type, numel)


class _ArchiveReader:
    """The zip archive of one torch.save file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise CheckpointFormatError(
                f"{path} is not a complete PyTorch checkpoint ({e}); it is truncated or corrupt: copy it again "
                "from the source") from None
        pickles = [n for n in self.zip.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path} is a zip file but not a torch.save archive "
                                        f"(expected one data.pkl, found {len(pickles)})")
        self.prefix = pickles[0][: -len("data.pkl")]
        names = set(self.zip.namelist())
        order = self.prefix + "byteorder"
        self.big_endian = order in names and self.zip.read(order).strip() == b"big"
        self._storages: Dict[str, _Storage] = {}

    def read_entry(self, name: str) -> bytes:
        full = self.prefix + name
        try:
            return self.zip.read(full)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: entry {full} is missing; the file is truncated or "
                                        "corrupt") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC mismatch, short read
            raise CheckpointFormatError(f"{self.path}: entry {full} is damaged ({e}); copy the file again "
                                        "from the source") from None

    def storage(self, key: str, storage_type: _StorageType, numel: int) -> _Storage:
        if key not in self._storages:
            self._storages[key] = _Storage(self, key, storage_type, numel)
        return self._storages[key]

    def load(self) -> Tuple[Any, Dict[str, int]]:
        unpickler = SafeUnpickler(io.BytesIO(self.read_entry("data.pkl")), self)
        try:
            obj = unpickler.load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as e:  # malformed pickle stream
            raise CheckpointFormatError(f"{self.path}: data.pkl cannot be read ({type(e).__name__}: {e}); the file "
                                        "is corrupt") from None
        return obj, unpickler.placeholders


ZIP_MAGIC = b"PK\x03\x04"


def read_torch_file(path) -> Any:
    """The object `torch.save` wrote to `path`, with tensors as numpy arrays; see the module docstring."""
    obj, _ = read_torch_file_with_report(path)
    return obj


def read_torch_file_with_report(path) -> Tuple[Any, Dict[str, int]]:
    """(object, {global name: count}) where the dict counts the placeholders made for unknown globals."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC:
        if head[:1] == b"\x80":
            raise CheckpointFormatError(
                f"{path} uses PyTorch's pre-1.6 serialization, which mindtron reads only through PyTorch: install "
                "torch and pass --reader torch, or re-save the file with a current torch.save")
        raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint (it does not start with a zip header); "
                                    "it is empty, truncated or another kind of file")
    reader = _ArchiveReader(path)
    try:
        return reader.load()
    finally:
        reader.zip.close()


# --------------------------------------------------------------------------------------------------------
# Optional: PyTorch's own loader
# --------------------------------------------------------------------------------------------------------
def torch_available() -> bool:
    """Whether PyTorch can be imported (it is never required)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _from_torch(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    if isinstance(obj, torch.dtype):
        return TorchDtype(str(obj).split(".", 1)[1])
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _from_torch(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_torch(v) for v in obj) if not hasattr(obj, "_fields") else obj
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _from_torch(v) for k, v in vars(obj).items()})
    return obj


def load_torch_file(path, reader: str = "auto") -> Tuple[Any, Dict[str, int]]:
    """Read a torch.save file with tensors as numpy arrays: (object, placeholder counts by global name).

    reader "python": this module's reader (zip format only). "torch": `torch.load(weights_only=True)`, which
    also reads the pre-1.6 format; when PyTorch's restricted loader refuses a class a checkpoint may hold
    (Transformer Engine's `_extra_state` BytesIO, an unusual argument value), the file is read again by
    this module's reader, which loads it with placeholders. "auto": the python reader for zip files, PyTorch
    (when installed) for the old format.
    """
    path = Path(path)
    if reader not in ("auto", "python", "torch"):
        raise ValueError(f"--reader {reader!r}: use auto, python or torch")
    if reader == "auto":
        is_zip = False
        if path.is_file():
            with open(path, "rb") as f:
                is_zip = f.read(4) == ZIP_MAGIC
        reader = "torch" if (not is_zip and path.is_file() and torch_available()) else "python"
    if reader == "python":
        return read_torch_file_with_report(path)
    if not torch_available():
        raise ValueError("--reader torch needs PyTorch (pip install torch); the default reader does not")
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return read_torch_file_with_report(path)  # refused by PyTorch's allow-list: placeholders or refusal here
    except (RuntimeError, EOFError) as e:
        raise CheckpointFormatError(f"{path} cannot be read by torch.load ({e}); the file is truncated or "
                                    "corrupt") from None
    return _from_torch(obj), {}


def is_placeholder(obj) -> bool:
    """True for an object standing in for a class the reader did not load."""
    return isinstance(obj, Placeholder)


__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "TorchDtype", "Placeholder", "read_torch_file",
           "read_torch_file_with_report", "load_torch_file", "torch_available", "is_placeholder"]
