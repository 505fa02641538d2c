"""Writing files in `torch.save`'s zip format without PyTorch (for Megatron-LM checkpoints).

The object may hold dicts, OrderedDicts, lists, tuples, numbers, strings, None, `argparse.Namespace`,
`TorchDtype` and numpy arrays; each array becomes a tensor with its own storage, pickled exactly as
torch.save pickles one: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
OrderedDict())` with the storage as a persistent id ('storage', torch.FloatStorage, key, 'cpu', numel).
Entries are stored uncompressed, each storage's bytes start on a 64-byte boundary as PyTorch aligns
them, and the file appears atomically (written under a temporary name, then renamed).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from mindtron.convert.torch_reader import TorchDtype

_STORAGE_NAMES = {
    np.dtype("float64"): "DoubleStorage", np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage",
}
ALIGNMENT = 64


class _Global:
    """A reference to `module.name`, pickled as a GLOBAL opcode without importing the module."""

    _cache: Dict[tuple, "_Global"] = {}

    def __new__(cls, module: str, name: str):
        key = (module, name)
        if key not in cls._cache:
            obj = object.__new__(cls)
            obj.module, obj.name = module, name
            cls._cache[key] = obj
        return cls._cache[key]

    def __call__(self, *args):  # pickle only checks that a reduce function is callable
        raise TypeError(f"{self.module}.{self.name} is a pickled reference, not callable here")


class _StorageRef:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _TensorRef:
    def __init__(self, storage: _StorageRef):
        self.storage = storage

    def __reduce__(self):
        array = self.storage.array
        strides = tuple(s // array.itemsize for s in array.strides)
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, tuple(array.shape), strides, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            name = _STORAGE_NAMES[obj.array.dtype]
            return ("storage", _Global("torch", name), obj.key, "cpu", int(obj.array.size))
        return None

    def _save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    def _save_dtype(self, obj):
        self._save_global_ref(_Global("torch", obj.name))

    dispatch[_Global] = _save_global_ref
    dispatch[TorchDtype] = _save_dtype


def _with_tensor_refs(obj, storages: List[_StorageRef]):
    """A copy of `obj` with each numpy array replaced by a tensor reference (arrays collected in order)."""
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(f"cannot write a {array.dtype} array as a PyTorch tensor")
        ref = _StorageRef(str(len(storages)), array)
        storages.append(ref)
        return _TensorRef(ref)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _with_tensor_refs(v, storages)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _with_tensor_refs(v, storages) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_with_tensor_refs(v, storages) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_with_tensor_refs(v, storages) for v in obj)
    return obj


def _aligned_info(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """A stored-entry header whose data starts on an ALIGNMENT boundary (padding in an extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 4  # local header + name + extra-field header
    pad = (-start) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_torch_file(obj: Any, path, archive_name: str = "archive") -> None:
    """Write `obj` to `path` in torch.save's format (atomically: a temporary file renamed into place)."""
    path = Path(path)
    storages: List[_StorageRef] = []
    converted = _with_tensor_refs(obj, storages)
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(converted)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(_aligned_info(zf, f"{archive_name}/data.pkl"), buffer.getvalue())
        zf.writestr(_aligned_info(zf, f"{archive_name}/byteorder"), b"little")
        for ref in storages:
            data = ref.array.astype(ref.array.dtype.newbyteorder("<"), copy=False)
            info = _aligned_info(zf, f"{archive_name}/data/{ref.key}")
            with zf.open(info, "w", force_zip64=data.nbytes >= (1 << 31)) as out:
                out.write(data.reshape(-1).view(np.uint8).data if data.size else b"")
        zf.writestr(_aligned_info(zf, f"{archive_name}/version"), b"3\n")
    os.replace(tmp, path)
