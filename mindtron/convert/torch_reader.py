"""Reading files written by `torch.save` without PyTorch and without running pickled code.

Since PyTorch 1.6 `torch.save` writes a zip archive (entries stored uncompressed) under one top folder:

    <name>/data.pkl      the pickled object; every tensor names its storage by a persistent id
                         ('storage', <torch.XStorage>, key, location, element count)
    <name>/data/<key>    the raw bytes of each storage, in the byte order of <name>/byteorder (little)
    <name>/version       the serialization version (newer files add .format_version, .storage_alignment, ...)

`read_torch_file` reads the zip directly and unpickles `data.pkl` with `safe_pickle.SafeUnpickler`, allowing
in addition the tensor and parameter rebuild functions (they become numpy arrays) and the storage types. Any
other class becomes an inert `Placeholder` (Megatron's `signal.Signals` and enum arguments among them); a
pickle that reaches for code (os, subprocess, eval, exec, ...) makes the file refused with
`UnsafeCheckpointError`, without executing anything. An archive can also be read from a byte range of a
larger file (`byte_range`): PyTorch Distributed Checkpoint's `.distcp` files are concatenations of them.

bfloat16 tensors, which numpy cannot hold, are widened to float32 (exactly). PyTorch's pre-1.6 format
(a bare pickle stream) is not read here; `load_torch_file(..., reader="torch")` reads it when PyTorch is
installed.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from mindtron.convert.safe_pickle import (CheckpointFormatError, Placeholder, SafeUnpickler, TorchDtype,
                                          UnsafeCheckpointError, is_placeholder, torch_safe_globals)


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


def _archive_globals(module: str, name: str) -> Optional[Any]:
    """Globals a torch.save archive needs beyond safe_pickle's allow-list: tensor rebuilds and storage types."""
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
        return _StorageType(name, STORAGE_DTYPES[name])
    return None


class _FileWindow(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable file of their own (no copy)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, int(offset), int(length), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.length - self.pos)
        if want <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:want])
        self.pos += got
        return got


class _ArchiveReader:
    """The zip archive of one torch.save file (or of a byte range of a file); `where` names it in errors."""

    def __init__(self, source, where: str):
        self.where = where
        try:
            self.zip = zipfile.ZipFile(source)
        except zipfile.BadZipFile as e:
            raise CheckpointFormatError(
                f"{where} is not a complete PyTorch checkpoint ({e}); it is truncated or corrupt: copy it again "
                "from the source") from None
        pickles = [n for n in self.zip.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{where} is a zip file but not a torch.save archive "
                                        f"(expected one data.pkl, found {len(pickles)})")
        self.prefix = pickles[0][: -len("data.pkl")]
        names = set(self.zip.namelist())
        order = self.prefix + "byteorder"
        self.big_endian = order in names and self.zip.read(order).strip() == b"big"
        self._storages: Dict[str, _Storage] = {}

    @property
    def path(self) -> str:  # used in the storage errors
        return self.where

    def read_entry(self, name: str) -> bytes:
        full = self.prefix + name
        try:
            return self.zip.read(full)
        except KeyError:
            raise CheckpointFormatError(f"{self.where}: entry {full} is missing; the file is truncated or "
                                        "corrupt") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC mismatch, short read
            raise CheckpointFormatError(f"{self.where}: entry {full} is damaged ({e}); copy the file again "
                                        "from the source") from None

    def storage(self, key: str, storage_type: _StorageType, numel: int) -> _Storage:
        if key not in self._storages:
            self._storages[key] = _Storage(self, key, storage_type, numel)
        return self._storages[key]

    def _persistent(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self.where}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self.where}: storage {key} has unknown type {storage_type!r}")
        return self.storage(str(key), storage_type, numel)

    def load(self) -> Tuple[Any, Dict[str, int]]:
        unpickler = SafeUnpickler(io.BytesIO(self.read_entry("data.pkl")), self.where, _archive_globals,
                                  self._persistent)
        try:
            obj = unpickler.load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as e:  # malformed pickle stream
            raise CheckpointFormatError(f"{self.where}: data.pkl cannot be read ({type(e).__name__}: {e}); the "
                                        "file is corrupt") from None
        return obj, unpickler.placeholders


ZIP_MAGIC = b"PK\x03\x04"
ByteRange = Optional[Tuple[int, int]]  # (offset, length) of an archive inside a larger file


def _describe(path: Path, byte_range: ByteRange) -> str:
    return str(path) if byte_range is None else f"{path} (bytes {byte_range[0]}..{byte_range[0] + byte_range[1]})"


def _open(path: Path, byte_range: ByteRange):
    """The file (or its window) to read, after checking it exists and starts like a zip archive."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    f = open(path, "rb")
    source = f if byte_range is None else _FileWindow(f, *byte_range)
    if byte_range is not None and byte_range[0] + byte_range[1] > os.fstat(f.fileno()).st_size:
        f.close()
        raise CheckpointFormatError(f"{_describe(path, byte_range)} lies beyond the end of the file "
                                    f"({os.path.getsize(path)} bytes); the file is truncated")
    head = source.read(4)
    source.seek(0)
    if head != ZIP_MAGIC:
        f.close()
        where = _describe(path, byte_range)
        if head[:1] == b"\x80":
            raise CheckpointFormatError(
                f"{where} uses PyTorch's pre-1.6 serialization, which mindtron reads only through PyTorch: install "
                "torch and pass --reader torch, or re-save the file with a current torch.save")
        raise CheckpointFormatError(f"{where} is not a PyTorch checkpoint (it does not start with a zip header); "
                                    "it is empty, truncated or another kind of file")
    return f, source


def read_torch_file(path, byte_range: ByteRange = None) -> Any:
    """The object `torch.save` wrote to `path` (or to its bytes `byte_range` = (offset, length)), with
    tensors as numpy arrays; see the module docstring."""
    obj, _ = read_torch_file_with_report(path, byte_range)
    return obj


def read_torch_file_with_report(path, byte_range: ByteRange = None) -> Tuple[Any, Dict[str, int]]:
    """(object, {global name: count}) where the dict counts the placeholders made for unknown globals."""
    path = Path(path)
    f, source = _open(path, byte_range)
    try:
        reader = _ArchiveReader(source, _describe(path, byte_range))
        try:
            return reader.load()
        finally:
            reader.zip.close()
    finally:
        f.close()


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
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
        return type(obj)(**{k: _from_torch(v) for k, v in vars(obj).items()})
    return obj


def _torch_load(path: Path, byte_range: ByteRange) -> Tuple[Any, Dict[str, int]]:
    """torch.load(weights_only=True) with the globals of the file resolved as safe_pickle resolves them."""
    import torch

    where = _describe(path, byte_range)
    f, source = _open(path, byte_range)
    try:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # a damaged archive: torch.load below names the problem
            names = []
        pairs = torch_safe_globals(names, where)  # refuses a malicious pickle before torch reads it
        source.seek(0)
        try:
            with torch.serialization.safe_globals(pairs):
                obj = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # a global PyTorch handles differently: read it here instead
            source.seek(0)
            return read_torch_file_with_report(path, byte_range)
        except (RuntimeError, EOFError) as e:
            raise CheckpointFormatError(f"{where} cannot be read by torch.load ({e}); the file is truncated or "
                                        "corrupt") from None
    finally:
        f.close()
    counts: Dict[str, int] = {}
    for found, full in pairs:
        if isinstance(found, type) and issubclass(found, Placeholder):
            counts[full] = counts.get(full, 0) + 1
    return _from_torch(obj), counts


def load_torch_file(path, reader: str = "auto", byte_range: ByteRange = None) -> Tuple[Any, Dict[str, int]]:
    """Read a torch.save file (or the archive at `byte_range` inside it) with tensors as numpy arrays:
    (object, placeholder counts by global name).

    reader "python": this module's reader (zip format only). "torch": `torch.load(weights_only=True)`, which
    also reads the pre-1.6 format; the globals PyTorch's restricted loader does not know (Megatron's enums,
    `signal.Signals`, Transformer Engine's `BytesIO` extra state, ...) are allowed as the same inert
    placeholders, and a pickle that reaches for code is refused before PyTorch reads it. "auto": the python
    reader for zip files, PyTorch (when installed) for the old format.
    """
    path = Path(path)
    if reader not in ("auto", "python", "torch"):
        raise ValueError(f"--reader {reader!r}: use auto, python or torch")
    if reader == "auto":
        is_zip = False
        if path.is_file() and byte_range is None:
            with open(path, "rb") as f:
                is_zip = f.read(4) == ZIP_MAGIC
        reader = "torch" if (not is_zip and byte_range is None and path.is_file() and torch_available()) \
            else "python"
    if reader == "python":
        return read_torch_file_with_report(path, byte_range)
    if not torch_available():
        raise ValueError("--reader torch needs PyTorch (pip install torch); the default reader does not")
    return _torch_load(path, byte_range)


__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "TorchDtype", "Placeholder", "read_torch_file",
           "read_torch_file_with_report", "load_torch_file", "torch_available", "is_placeholder"]
