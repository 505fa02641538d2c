"""Reading a PyTorch Distributed Checkpoint (DCP) directory without PyTorch and without running pickled code.

    <dir>/.metadata        a pickle of DCP's `Metadata`: for every key its global shape, dtype and chunks
                           (offsets and sizes in global coordinates), or "bytes" for a pickled object, and
                           where each chunk or object lies: (file, byte offset, byte length)
    <dir>/__R_0.distcp     data written by rank R: items one after another, each a complete torch.save archive
                           (one tensor chunk, or the torch.save of an object)

`.metadata` is unpickled by `safe_pickle` with inert stand-ins for DCP's dataclasses (`Metadata`,
`TensorStorageMetadata`, `ChunkStorageMetadata`, `MetadataIndex`, `_StorageInfo`, ...); their fields are read
from the pickled state. A tensor is read by allocating its global shape and copying each chunk (read by
`torch_reader` from its byte range) to its offsets; the chunks must tile the tensor (`covered` tells which
slices of the first dimension they cover when they do not, as for layer-stacked tensors of which only some
layers exist).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mindtron.convert.safe_pickle import CheckpointFormatError, Placeholder, TorchDtype, safe_loads
from mindtron.convert.torch_reader import load_torch_file

METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint"
_NUMPY_DTYPES = {"float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
                 "float16": "float16", "half": "float16", "bfloat16": "float32", "int64": "int64", "long": "int64",
                 "int32": "int32", "int": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: its place in the global tensor and where its archive lies."""

    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    file: str
    byte_offset: int
    byte_length: int


@dataclass
class TensorEntry:
    """A tensor of the checkpoint: global shape, dtype name (torch's), stored chunks."""

    key: str
    shape: Tuple[int, ...]
    dtype: str
    chunks: List[Chunk]


@dataclass(frozen=True)
class ObjectEntry:
    """A pickled object of the checkpoint and where its torch.save archive lies."""

    key: str
    file: str
    byte_offset: int
    byte_length: int


def _is(obj: Any, name: str) -> bool:
    """Whether `obj` is the stand-in for DCP class `name` (module-qualified below torch.distributed.checkpoint)."""
    return isinstance(obj, Placeholder) and obj.source == f"{_DCP}.{name}"


def _fields(obj: Any, name: str, where: str) -> Dict[str, Any]:
    if not _is(obj, name):
        raise CheckpointFormatError(f"{where}: expected a {name} in .metadata, found {obj!r}; the file is not a "
                                    "PyTorch Distributed Checkpoint index or is corrupt")
    return obj.fields


def _sizes(value, what: str, where: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise CheckpointFormatError(f"{where}: {what} is {value!r}, not a list of integers; .metadata is corrupt")
    return tuple(int(v) for v in value)


def _dtype(properties: Any) -> Optional[TorchDtype]:
    """The dtype of a TensorProperties stand-in (pickled as a 5-tuple state, or as a field dict)."""
    if not _is(properties, "metadata.TensorProperties"):
        return None
    state = properties.state
    dtype = state[0] if isinstance(state, tuple) and state else properties.fields.get("dtype")
    return dtype if isinstance(dtype, TorchDtype) else None


class DcpCheckpoint:
    """The index of a DCP directory, and reading its tensors and objects (see the module docstring)."""

    def __init__(self, directory, reader: str = "python"):
        self.directory = Path(directory)
        self.reader = reader
        path = self.directory / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {self.directory} is not a complete distributed checkpoint")
        where = str(path)
        metadata, _ = safe_loads(path.read_bytes(), where)  # its placeholders are DCP's own classes
        self.placeholders: Dict[str, int] = {}  # those of the objects read (Megatron's arguments, ...)
        fields = _fields(metadata, "metadata.Metadata", where)
        index = fields.get("state_dict_metadata")
        storage = fields.get("storage_data")
        if not isinstance(index, dict) or not isinstance(storage, dict):
            raise CheckpointFormatError(f"{where} lacks state_dict_metadata or storage_data; it is corrupt or "
                                        "written by an unsupported PyTorch version")
        locations: Dict[Tuple[str, Optional[Tuple[int, ...]]], Tuple[str, int, int]] = {}
        for key, info in storage.items():
            mi = _fields(key, "metadata.MetadataIndex", where)
            si = _fields(info, "filesystem._StorageInfo", where)
            if si.get("transform_descriptors"):
                raise CheckpointFormatError(f"{where}: {mi.get('fqn')} is stored with transforms "
                                            f"{si['transform_descriptors']} (compression, ...), which this reader "
                                            "does not undo; re-save the checkpoint without them")
            offset = mi.get("offset")
            locations[(mi.get("fqn"), None if offset is None else _sizes(offset, "an offset", where))] = (
                str(si.get("relative_path")), int(si.get("offset", 0)), int(si.get("length", -1)))
        self.tensors: Dict[str, TensorEntry] = {}
        self.objects: Dict[str, ObjectEntry] = {}
        for key, entry in index.items():
            if _is(entry, "metadata.BytesStorageMetadata"):
                if (key, None) not in locations:
                    raise CheckpointFormatError(f"{where}: object {key} has no storage location; .metadata is corrupt")
                self.objects[key] = ObjectEntry(key, *locations[(key, None)])
                continue
            meta = _fields(entry, "metadata.TensorStorageMetadata", where)
            dtype = _dtype(meta.get("properties"))
            if dtype is None:
                raise CheckpointFormatError(f"{where}: tensor {key} has no dtype; .metadata is corrupt")
            chunks = []
            for chunk in meta.get("chunks") or []:
                c = _fields(chunk, "metadata.ChunkStorageMetadata", where)
                offsets = _sizes(c.get("offsets"), f"a chunk offset of {key}", where)
                if (key, offsets) not in locations:
                    raise CheckpointFormatError(f"{where}: chunk {list(offsets)} of {key} has no storage location; "
                                                ".metadata is corrupt")
                chunks.append(Chunk(offsets, _sizes(c.get("sizes"), f"a chunk size of {key}", where),
                                    *locations[(key, offsets)]))
            self.tensors[key] = TensorEntry(key, _sizes(meta.get("size"), f"the shape of {key}", where), dtype.name,
                                            chunks)

    def _load_item(self, file: str, offset: int, length: int, what: str) -> Any:
        path = self.directory / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (it holds {what}): the checkpoint is incomplete")
        obj, placeholders = load_torch_file(path, self.reader, (offset, length))
        for source, count in placeholders.items():
            self.placeholders[source] = self.placeholders.get(source, 0) + count
        return obj

    def read_object(self, key: str) -> Any:
        """The object stored under `key` (torch.save'd by DCP)."""
        entry = self.objects[key]
        return self._load_item(entry.file, entry.byte_offset, entry.byte_length, f"object {key}")

    def covered(self, key: str) -> np.ndarray:
        """For each index of the first dimension of tensor `key`: whether its chunks fill that slice. A slice
        they fill only in part is a CheckpointFormatError (chunks missing or overlapping)."""
        entry = self.tensors[key]
        if not entry.shape:
            return np.ones(1, bool)
        per_slice = int(np.prod(entry.shape[1:], dtype=np.int64))
        filled = np.zeros(entry.shape[0], np.int64)
        for chunk in entry.chunks:
            filled[chunk.offsets[0]: chunk.offsets[0] + chunk.sizes[0]] += int(np.prod(chunk.sizes[1:], dtype=np.int64))
        partial = np.flatnonzero((filled != 0) & (filled != per_slice))
        if partial.size:
            raise CheckpointFormatError(f"{self.directory}: the chunks of {key} fill slices {partial[:8].tolist()} of "
                                        f"its first dimension only in part; the checkpoint is incomplete or corrupt")
        return filled == per_slice

    def read_tensor(self, key: str) -> np.ndarray:
        """The global tensor `key` assembled from its chunks (bfloat16 widened to float32); uncovered slices of
        the first dimension (see `covered`) are left zero."""
        entry = self.tensors[key]
        self.covered(key)
        if entry.dtype not in _NUMPY_DTYPES:
            raise CheckpointFormatError(f"{self.directory}: tensor {key} has dtype torch.{entry.dtype}, which the "
                                        "converter does not read")
        dtype = np.dtype(_NUMPY_DTYPES[entry.dtype])
        out = np.zeros(entry.shape, dtype)
        for chunk in entry.chunks:
            data = self._load_item(chunk.file, chunk.byte_offset, chunk.byte_length,
                                   f"chunk {list(chunk.offsets)} of {key}")
            if not isinstance(data, np.ndarray) or tuple(data.shape) != chunk.sizes:
                shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
                raise CheckpointFormatError(f"{self.directory / chunk.file}: chunk {list(chunk.offsets)} of {key} "
                                            f"holds {shape}, the index says {list(chunk.sizes)}; the file is corrupt")
            if any(o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.shape)):
                raise CheckpointFormatError(f"{self.directory}: chunk {list(chunk.offsets)} + {list(chunk.sizes)} of "
                                            f"{key} lies outside its shape {list(entry.shape)}; .metadata is corrupt")
            out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = data
        return out


__all__ = ["DcpCheckpoint", "TensorEntry", "ObjectEntry", "Chunk", "METADATA_FILE"]
