"""Megatron's indexed dataset: token sequences in a `.bin` file described by a `.idx` file.

The byte layout (all integers little-endian) is the one Megatron-LM's `tools/preprocess_data.py` writes and
`megatron.core.datasets.indexed_dataset` reads, so files move between the two unchanged:

`.idx`
    offset 0   9 bytes   magic ``b"MMIDIDX\\x00\\x00"``
    offset 9   uint64    format version, always 1
    offset 17  uint8     token dtype code (see `DType`)
    offset 18  uint64    S, number of sequences
    offset 26  uint64    D, number of entries in the document index (documents + 1)
    offset 34  int32[S]  length of each sequence, in tokens
               int64[S]  byte offset of each sequence in the .bin file
               int64[D]  document index: sequence ids where documents start, 0 first, S last
               int8[S]   (multimodal files only) one mode per sequence

`.bin`
    the tokens of every sequence back to back, in the dtype of the header, no header or padding.

A "sequence" is what preprocessing stored as one unit: a whole document, or one sentence with
`--split-sentences`. GPT training treats sequences as its documents.
"""
from __future__ import annotations

import enum
import os
import shutil
import struct
from typing import List, Optional, Sequence, Type, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34


class DType(enum.Enum):
    """Token dtype codes of the `.idx` header (Megatron-Core's table)."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_from_dtype(cls, dtype) -> int:
        """Header code of a numpy dtype (np.uint16, "int32", np.dtype(...))."""
        name = np.dtype(dtype).name
        try:
            return cls[name].value
        except KeyError:
            supported = ", ".join(d.name for d in cls)
            raise ValueError(f"dtype {name} cannot be stored in a Megatron indexed dataset; use one of "
                             f"{supported}") from None

    @classmethod
    def dtype_from_code(cls, code: int) -> Type[np.number]:
        """numpy scalar type of a header code."""
        try:
            return getattr(np, cls(code).name)
        except ValueError:
            raise ValueError(f"unknown dtype code {code}; Megatron's codes are "
                             f"{ {d.value: d.name for d in cls} }") from None

    @staticmethod
    def size(key: Union[int, Type[np.number], np.dtype, str]) -> int:
        """Bytes per token of a header code or a dtype."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return np.dtype(DType.dtype_from_code(int(key))).itemsize
        return np.dtype(key).itemsize

    @staticmethod
    def optimal_dtype(cardinality: Optional[int]) -> Type[np.number]:
        """The dtype preprocessing uses for a vocabulary of `cardinality` ids: uint16 below 65500, else
        int32 (Megatron's rule)."""
        if cardinality is not None and cardinality < 65500:
            return np.uint16
        return np.int32


def get_idx_path(path_prefix: str) -> str:
    """`prefix.idx`."""
    return path_prefix + ".idx"


def get_bin_path(path_prefix: str) -> str:
    """`prefix.bin`."""
    return path_prefix + ".bin"


def _missing_files_message(path_prefix: str, missing: List[str]) -> str:
    hint = ""
    if path_prefix.endswith((".bin", ".idx")):
        hint = f" The prefix should not include the suffix: use {path_prefix[:-4]!r}."
    else:
        folder = os.path.dirname(path_prefix) or "."
        if os.path.isdir(folder):
            stem = os.path.basename(path_prefix)
            near = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".idx") and stem[:4] in f)[:3]
            if near:
                hint = f" Prefixes found in {folder}: {near}."
    return (f"indexed dataset {path_prefix!r}: missing {', '.join(missing)}. Pass the path without the "
            f".bin/.idx suffix, and create the pair with tools/preprocess_data.py (or Megatron's) if it does "
            f"not exist yet.{hint}")


class _Index:
    """The parsed `.idx` file: dtype, sequence lengths, byte pointers and document index (memory-mapped)."""

    def __init__(self, idx_path: str, multimodal: bool = False):
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
            found = head[:len(MAGIC)]
            raise ValueError(f"{idx_path}: bad header {found!r}, expected {MAGIC!r}. This is not a Megatron "
                             "indexed-dataset .idx file (the old 'TNTIDX' / lazy formats are not supported); "
                             "re-create it with tools/preprocess_data.py")
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{idx_path}: truncated header ({len(head)} of {HEADER_BYTES} bytes); the file was "
                             "cut short, re-create it with tools/preprocess_data.py")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise ValueError(f"{idx_path}: format version {version}, only version {VERSION} exists; the file is "
                             "damaged or not a Megatron .idx file")
        self.dtype = DType.dtype_from_code(code)
        self.dtype_size = DType.size(self.dtype)
        self.sequence_count, self.document_count = int(n_seq), int(n_doc)
        need = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8 + (n_seq if multimodal else 0)
        if size < need:
            raise ValueError(f"{idx_path}: truncated ({size} bytes, the header announces {n_seq} sequences and "
                             f"{n_doc} document-index entries, which need {need} bytes); re-create the .bin/.idx "
                             "pair with tools/preprocess_data.py")
        buffer = np.memmap(idx_path, mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)
        self._buffer = buffer
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buffer, np.int32, n_seq, offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buffer, np.int64, n_seq, offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(buffer, np.int64, n_doc, offset)
        offset += 8 * n_doc
        self.sequence_modes = np.frombuffer(buffer, np.int8, n_seq, offset) if multimodal else None
        if n_doc == 0 or self.document_indices[-1] != n_seq or self.document_indices[0] != 0:
            raise ValueError(f"{idx_path}: inconsistent document index (it must start at 0 and end at the "
                             f"sequence count {n_seq}); the file is damaged, re-create it")

    def __len__(self) -> int:
        return self.sequence_count


class IndexedDataset:
    """Read-only view of a Megatron `.bin`/`.idx` pair (Megatron-Core's `IndexedDataset` surface).

    `len(ds)` is the number of sequences, `ds[i]` a numpy array of sequence i's token ids (in the stored
    dtype), `ds[a:b]` a list of them, `ds.get(i, offset, length)` part of one sequence.
    `ds.sequence_lengths` and `ds.document_indices` are the index arrays. The `.bin` file is memory-mapped
    (or read on demand with `mmap=False`), so opening a large dataset costs almost nothing.
    """

    def __init__(self, path_prefix: str, multimodal: bool = False, mmap: bool = True):
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(_missing_files_message(path_prefix, missing))
        self.path_prefix, self.multimodal, self.mmap = path_prefix, multimodal, mmap
        self.index = _Index(idx_path, multimodal)
        self.bin_path = bin_path
        bin_size = os.path.getsize(bin_path)
        n = self.index.sequence_count
        expected = int(self.index.sequence_lengths.astype(np.int64).sum()) * self.index.dtype_size
        if n:
            end = int(self.index.sequence_pointers[-1]) + int(self.index.sequence_lengths[-1]) * self.index.dtype_size
            expected = max(expected, end)
        if bin_size < expected:
            raise ValueError(f"{bin_path}: truncated ({bin_size} bytes, its .idx describes {expected} bytes of "
                             f"{np.dtype(self.index.dtype).name} tokens); the .bin and .idx do not belong together "
                             "or the copy was cut short; re-create them with tools/preprocess_data.py")
        if mmap:
            self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        else:
            self._bin = None

    # -- reading -------------------------------------------------------------------------------------
    def _read(self, count: int, byte_offset: int) -> np.ndarray:
        if self._bin is not None:
            return np.frombuffer(self._bin, self.index.dtype, count, byte_offset)
        out = np.empty(count, self.index.dtype)
        with open(self.bin_path, "rb", buffering=0) as f:
            f.seek(byte_offset)
            f.readinto(out)
        return out

    def __len__(self) -> int:
        return self.index.sequence_count

    def __getitem__(self, idx: Union[int, np.integer, slice]):
        if isinstance(idx, (int, np.integer)):
            i = self._check(idx)
            tokens = self._read(int(self.index.sequence_lengths[i]), int(self.index.sequence_pointers[i]))
            return (tokens, self.index.sequence_modes[i]) if self.multimodal else tokens
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            if stop <= start:
                return ([], self.index.sequence_modes[start:start]) if self.multimodal else []
            lengths = self.index.sequence_lengths[start:stop].astype(np.int64)
            flat = self._read(int(lengths.sum()), int(self.index.sequence_pointers[start]))
            parts = np.split(flat, np.cumsum(lengths)[:-1])
            return (parts, self.index.sequence_modes[start:stop]) if self.multimodal else parts
        raise TypeError(f"IndexedDataset indices must be integers or slices, not {type(idx).__name__}")

    def _check(self, idx) -> int:
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.path_prefix}")
        return i

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None):
        """Tokens [offset, offset + length) of sequence `idx` (to its end when length is None)."""
        i = self._check(idx)
        size = int(self.index.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        pointer = int(self.index.sequence_pointers[i]) + offset * self.index.dtype_size
        tokens = self._read(int(length), pointer)
        return (tokens, self.index.sequence_modes[i]) if self.multimodal else tokens

    # -- index arrays --------------------------------------------------------------------------------
    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [S]: tokens per sequence."""
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 [S]: byte offset of each sequence in the .bin file."""
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [documents + 1]: first sequence of each document, then the sequence count."""
        return self.index.document_indices

    def get_document_indices(self) -> np.ndarray:
        """Same as `document_indices` (Megatron's older accessor)."""
        return self.index.document_indices

    @property
    def sequence_modes(self) -> Optional[np.ndarray]:
        """int8 [S] modes of a multimodal dataset, None otherwise."""
        return self.index.sequence_modes

    @property
    def dtype(self):
        """numpy scalar type of the stored tokens."""
        return self.index.dtype

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both `prefix.bin` and `prefix.idx` exist."""
        return os.path.isfile(get_idx_path(path_prefix)) and os.path.isfile(get_bin_path(path_prefix))

    def __getstate__(self):
        return self.path_prefix, self.multimodal, self.mmap

    def __setstate__(self, state):
        self.__init__(*state)

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}: {len(self)} sequences, "
                f"{len(self.document_indices) - 1} documents, {np.dtype(self.dtype).name})")


def write_index(idx_path: str, dtype, sequence_lengths: Sequence[int], document_indices: Sequence[int],
                sequence_modes: Optional[Sequence[int]] = None) -> None:
    """Write a `.idx` file for sequences stored back to back in `dtype` (pointers are derived)."""
    code = DType.code_from_dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if (lengths < 0).any() or (lengths > np.iinfo(np.int32).max).any():
        raise ValueError("sequence lengths must fit in int32 and be non-negative")
    pointers = np.zeros(len(lengths), np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1] * DType.size(dtype), out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    tmp = idx_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(docs.astype("<i8").tobytes())
        if sequence_modes is not None:
            f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes())
    os.replace(tmp, idx_path)


class IndexedDatasetBuilder:
    """Write a `.bin`/`.idx` pair Megatron can read (Megatron-Core's `IndexedDatasetBuilder` surface).

    >>> b = IndexedDatasetBuilder("out.bin", dtype=np.uint16)
    >>> b.add_item([5, 6, 7]); b.end_document()          # one document of one sequence
    >>> b.add_document([1, 2, 3, 4], lengths=[1, 3])     # one document of two sequences (sentences)
    >>> b.finalize("out.idx")
    """

    def __init__(self, bin_path: str, dtype=np.int32, multimodal: bool = False):
        DType.code_from_dtype(dtype)  # validates
        self.bin_path, self.dtype, self.multimodal = bin_path, np.dtype(dtype).type, multimodal
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths: List[int] = []
        self.document_indices: List[int] = [0]
        self.sequence_modes: Optional[List[int]] = [] if multimodal else None

    def _tokens(self, values) -> np.ndarray:
        if hasattr(values, "asnumpy"):
            values = values.asnumpy()
        elif hasattr(values, "numpy") and not isinstance(values, np.ndarray):
            values = values.numpy()
        array = np.asarray(values)
        if array.size and np.issubdtype(array.dtype, np.integer) and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"token ids in [{array.min()}, {array.max()}] do not fit the dataset dtype "
                                 f"{np.dtype(self.dtype).name}; use a wider dtype")
        return np.ascontiguousarray(array.reshape(-1), dtype=self.dtype)

    def add_item(self, tokens, mode: int = 0) -> None:
        """Append one sequence (call `end_document()` after the last sequence of a document)."""
        array = self._tokens(tokens)
        self.data_file.write(array.tobytes(order="C"))
        self.sequence_lengths.append(int(array.size))
        if self.multimodal:
            self.sequence_modes.append(int(mode))

    def add_document(self, tokens, lengths: Sequence[int], modes: Optional[Sequence[int]] = None) -> None:
        """Append a whole document: `tokens` holds its sequences back to back, `lengths` their sizes."""
        array = self._tokens(tokens)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != array.size:
            raise ValueError(f"add_document: lengths sum to {sum(lengths)} but {array.size} tokens were given")
        self.data_file.write(array.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))
        if self.multimodal:
            self.sequence_modes.extend(modes if modes is not None else [0] * len(lengths))

    def end_document(self) -> None:
        """Close the current document (for use with `add_item`)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every document of an existing `.bin`/`.idx` pair of the same dtype."""
        other = IndexedDataset(path_prefix, multimodal=self.multimodal)
        if other.dtype != self.dtype:
            raise ValueError(f"add_index: {path_prefix} stores {np.dtype(other.dtype).name}, this builder "
                             f"{np.dtype(self.dtype).name}")
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(n) for n in other.sequence_lengths)
        self.document_indices.extend(int(d) + base for d in other.document_indices[1:])
        if self.multimodal:
            self.sequence_modes.extend(int(m) for m in other.sequence_modes)
        del other
        with open(get_bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self.data_file)

    def finalize(self, idx_path: str) -> None:
        """Close the `.bin` file and write the `.idx` file."""
        self.data_file.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices, self.sequence_modes)


def make_dataset(path_prefix: str, tokens_per_document: Sequence[Sequence[int]], dtype=np.int32) -> None:
    """Write `prefix.bin/.idx` holding one single-sequence document per list of ids (tests, small tools)."""
    builder = IndexedDatasetBuilder(get_bin_path(path_prefix), dtype)
    for doc in tokens_per_document:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(get_idx_path(path_prefix))
