"""torch.save's file format written byte by byte from its description, without PyTorch and without Python's
pickler, so the converter's reader is tested against the format rather than against one implementation:

    <archive>/data.pkl    protocol-2 pickle opcodes; a tensor is
                          GLOBAL torch._utils._rebuild_tensor_v2, then the argument tuple
                          (persistent id ('storage', GLOBAL torch.FloatStorage, key, 'cpu', numel),
                          storage offset, size, stride, requires_grad, GLOBAL collections.OrderedDict())
    <archive>/data/<key>  raw little-endian storage bytes
    <archive>/version     "3"
"""
from __future__ import annotations

import argparse
import struct
import zipfile
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

PROTO, STOP, MARK, TUPLE, EMPTY_TUPLE = b"\x80\x02", b".", b"(", b"t", b")"
EMPTY_DICT, SETITEMS, EMPTY_LIST, APPENDS = b"}", b"u", b"]", b"e"
REDUCE, BUILD, NEWOBJ, BINPERSID = b"R", b"b", b"\x81", b"Q"
NONE, NEWTRUE, NEWFALSE = b"N", b"\x88", b"\x89"
STORAGE = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage"}


class Global:
    """A GLOBAL opcode naming module.name (nothing is imported)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """GLOBAL function, then its argument tuple, then REDUCE: how a pickle calls something."""

    def __init__(self, function: Global, *args):
        self.function, self.args = function, args


class Obj:
    """GLOBAL cls, NEWOBJ, then BUILD with `state`: how an object of a dataclass-like class pickles."""

    def __init__(self, cls: Global, state: dict):
        self.cls, self.state = cls, state


class BFloat16:
    """A float32 array to be stored as torch.bfloat16 (top 16 bits of each value)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array, np.float32)


class Encoder:
    """Objects -> pickle opcodes; arrays become storages collected in `storages`."""

    def __init__(self):
        self.storages: List[Tuple[str, bytes]] = []

    def encode(self, obj: Any) -> bytes:
        if obj is None:
            return NONE
        if obj is True:
            return NEWTRUE
        if obj is False:
            return NEWFALSE
        if isinstance(obj, int):
            return b"J" + struct.pack("<i", obj)  # BININT
        if isinstance(obj, float):
            return b"G" + struct.pack(">d", obj)  # BINFLOAT (big-endian)
        if isinstance(obj, str):
            data = obj.encode("utf-8")
            return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
        if isinstance(obj, Global):
            return b"c" + f"{obj.module}\n{obj.name}\n".encode()
        if isinstance(obj, Call):
            return self.encode(obj.function) + self.encode(tuple(obj.args)) + REDUCE
        if isinstance(obj, Obj):
            return self.encode(obj.cls) + EMPTY_TUPLE + NEWOBJ + self.encode(obj.state) + BUILD
        if isinstance(obj, tuple):
            return EMPTY_TUPLE if not obj else MARK + b"".join(map(self.encode, obj)) + TUPLE
        if isinstance(obj, list):
            return EMPTY_LIST + (MARK + b"".join(map(self.encode, obj)) + APPENDS if obj else b"")
        if isinstance(obj, dict):
            body = b"".join(self.encode(k) + self.encode(v) for k, v in obj.items())
            return EMPTY_DICT + (MARK + body + SETITEMS if obj else b"")
        if isinstance(obj, argparse.Namespace):  # cls() via NEWOBJ, then its __dict__ via BUILD
            return self.encode(Global("argparse", "Namespace")) + EMPTY_TUPLE + NEWOBJ + self.encode(vars(obj)) + BUILD
        if isinstance(obj, (np.ndarray, BFloat16)):
            return self._tensor(obj)
        raise TypeError(type(obj))

    def _tensor(self, obj) -> bytes:
        if isinstance(obj, BFloat16):
            array = obj.array
            data = (np.ascontiguousarray(array).view(np.uint32) >> 16).astype("<u2").tobytes()
            storage_name, numel = "BFloat16Storage", array.size
        else:
            array = np.ascontiguousarray(obj)
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            storage_name, numel = STORAGE[array.dtype], array.size
        key = str(len(self.storages))
        self.storages.append((key, data))
        strides = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
        pid = self.encode(("storage", Global("torch", storage_name), key, "cpu", numel))
        args = (MARK + pid + BINPERSID + self.encode(0) + self.encode(tuple(array.shape)) + self.encode(strides)
                + NEWFALSE + self.encode(Global("collections", "OrderedDict")) + EMPTY_TUPLE + REDUCE + TUPLE)
        return self.encode(Global("torch._utils", "_rebuild_tensor_v2")) + args + REDUCE


def write_torch_zip(path: Path, obj: Any, archive: str = "archive") -> None:
    """Write `obj` in torch.save's zip layout (storages as data/0, data/1, ...)."""
    encoder = Encoder()
    pickled = PROTO + encoder.encode(obj) + STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", pickled)
        zf.writestr(f"{archive}/byteorder", b"little")
        for key, data in encoder.storages:
            zf.writestr(f"{archive}/data/{key}", data)
        zf.writestr(f"{archive}/version", b"3\n")
