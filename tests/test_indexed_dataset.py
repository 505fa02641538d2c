"""Megatron .bin/.idx files: round trips, byte-level compatibility, and errors for damaged files."""
import os
import struct

import numpy as np
import pytest

from mindtron.data.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder, make_dataset

# Megatron-Core's dtype codes, written out independently of the implementation.
MEGATRON_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                  8: np.uint16}


def megatron_idx_bytes(code, lengths, doc_index, itemsize):
    """The .idx bytes Megatron writes, from the format description: magic, version, dtype code, counts,
    int32 lengths, int64 byte pointers, int64 document index."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    pointer = 0
    for n in lengths:
        out += struct.pack("<q", pointer)
        pointer += n * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_index)
    return out


def write_megatron_pair(prefix, code, sequences, doc_index):
    dtype = MEGATRON_CODES[code]
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            f.write(np.asarray(seq, dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(megatron_idx_bytes(code, [len(s) for s in sequences], doc_index, np.dtype(dtype).itemsize))


@pytest.mark.parametrize("code", sorted(MEGATRON_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = MEGATRON_CODES[code]
    rng = np.random.default_rng(code)
    prefix = str(tmp_path / f"d{code}")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs = []
    for d in range(7):
        n_sent = int(rng.integers(1, 4))
        sents = [rng.integers(0, 100, size=int(rng.integers(1, 9))).astype(dtype) for _ in range(n_sent)]
        docs.append(sents)
        if d % 2:
            builder.add_document(np.concatenate(sents), [len(s) for s in sents])
        else:
            for s in sents:
                builder.add_item(s)
            builder.end_document()
    builder.finalize(prefix + ".idx")

    flat = [s for doc in docs for s in doc]
    for mmap in (True, False):
        ds = IndexedDataset(prefix, mmap=mmap)
        assert len(ds) == len(flat) and ds.dtype == dtype
        assert list(ds.sequence_lengths) == [len(s) for s in flat]
        assert list(ds.document_indices) == list(np.cumsum([0] + [len(doc) for doc in docs]))
        for i, s in enumerate(flat):
            np.testing.assert_array_equal(ds[i], s)
            assert ds[i].dtype == dtype
        np.testing.assert_array_equal(ds.get(3, offset=1), flat[3][1:])
        np.testing.assert_array_equal(ds.get(4, offset=0, length=1), flat[4][:1])
        for got, want in zip(ds[2:6], flat[2:6]):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ds[-1], flat[-1])
    with open(prefix + ".idx", "rb") as f:  # the bytes are exactly Megatron's layout
        assert f.read() == megatron_idx_bytes(code, [len(s) for s in flat], list(ds.document_indices),
                                              np.dtype(dtype).itemsize)


@pytest.mark.parametrize("code", [8, 4])
def test_file_written_from_the_format_description_reads_back(tmp_path, code):
    prefix = str(tmp_path / "megatron")
    sequences = [[50256, 1, 2], [7], [3, 4, 5, 6, 7, 8], [9, 10], [11]]
    doc_index = [0, 2, 3, 5]  # documents: (seq 0, 1), (seq 2), (seq 3, 4)
    write_megatron_pair(prefix, code, sequences, doc_index)
    ds = IndexedDataset(prefix)
    assert len(ds) == 5 and ds.dtype == MEGATRON_CODES[code]
    assert list(ds.document_indices) == doc_index
    assert list(ds.sequence_pointers) == list(np.cumsum([0] + [len(s) for s in sequences[:-1]])
                                              * np.dtype(MEGATRON_CODES[code]).itemsize)
    for i, s in enumerate(sequences):
        assert ds[i].tolist() == s
    assert ds.get(2, 2, 3).tolist() == [5, 6, 7]


def test_writer_bytes_match_the_format_description(tmp_path):
    prefix = str(tmp_path / "ours")
    make_dataset(prefix, [[1, 2, 3], [4], [5, 6]], dtype=np.uint16)
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == struct.pack("<6H", 1, 2, 3, 4, 5, 6)
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == megatron_idx_bytes(8, [3, 1, 2], [0, 1, 2, 3], 2)


def test_dtype_codes_and_optimal_dtype():
    for code, dtype in MEGATRON_CODES.items():
        assert DType.code_from_dtype(dtype) == code and DType.dtype_from_code(code) == dtype
        assert DType.size(code) == np.dtype(dtype).itemsize
    assert DType.optimal_dtype(50257) == np.uint16 and DType.optimal_dtype(65500) == np.int32
    assert DType.optimal_dtype(None) == np.int32
    with pytest.raises(ValueError, match="cannot be stored"):
        DType.code_from_dtype(np.uint32)


def test_add_index_concatenates_datasets(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_dataset(a, [[1, 2], [3]], dtype=np.int32)
    make_dataset(b, [[4, 5, 6]], dtype=np.int32)
    builder = IndexedDatasetBuilder(c + ".bin", dtype=np.int32)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(c + ".idx")
    ds = IndexedDataset(c)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6]]
    assert list(ds.document_indices) == [0, 1, 2, 3]


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_item([70000])


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    make_dataset(prefix, [])
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and list(ds.document_indices) == [0]


def test_missing_files_name_the_file_and_the_fix(tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    with pytest.raises(FileNotFoundError, match=r"corpus_text_document\.idx.*corpus_text_document\.bin.*preprocess"):
        IndexedDataset(prefix)
    make_dataset(prefix, [[1, 2, 3]])
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"missing .*corpus_text_document\.bin"):
        IndexedDataset(prefix)
    with pytest.raises(FileNotFoundError, match="without the suffix|should not include the suffix"):
        IndexedDataset(prefix + ".idx")


def _corrupt(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_damaged_files_raise_clear_errors(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, [[1, 2, 3], [4, 5]], dtype=np.int32)
    with open(prefix + ".idx", "rb") as f:
        good = f.read()

    _corrupt(prefix + ".idx", b"TNTIDX\x00\x00" + good[8:])
    with pytest.raises(ValueError, match=r"bad header.*d\.idx|d\.idx.*bad header"):
        IndexedDataset(prefix)
    _corrupt(prefix + ".idx", good[:20])
    with pytest.raises(ValueError, match="truncated header"):
        IndexedDataset(prefix)
    _corrupt(prefix + ".idx", good[:-5])
    with pytest.raises(ValueError, match=r"d\.idx: truncated"):
        IndexedDataset(prefix)
    _corrupt(prefix + ".idx", good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(ValueError, match="version 2"):
        IndexedDataset(prefix)
    _corrupt(prefix + ".idx", good[:17] + bytes([9]) + good[18:])
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        IndexedDataset(prefix)
    _corrupt(prefix + ".idx", good)
    with open(prefix + ".bin", "rb") as f:
        tokens = f.read()
    _corrupt(prefix + ".bin", tokens[:-4])
    with pytest.raises(ValueError, match=r"d\.bin: truncated"):
        IndexedDataset(prefix)
    _corrupt(prefix + ".bin", tokens)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)
