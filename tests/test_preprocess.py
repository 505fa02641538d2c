"""The preprocessing CLI (Megatron's tools/preprocess_data.py flags) and the bundled example data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindtron.data.example_corpus import build_example_data, generate_corpus
from mindtron.data.indexed_dataset import IndexedDataset
from mindtron.data.preprocess import main as preprocess, simple_sentence_split
from mindtron.data.tokenizers import GPT2BPETokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLE = os.path.join(ROOT, "examples", "gpt", "data")
VOCAB, MERGES = os.path.join(EXAMPLE, "vocab.json"), os.path.join(EXAMPLE, "merges.txt")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]

DOCS = [{"text": "On a rainy Monday, Ada the baker walked to the market.", "title": "Ada"},
        {"text": "\"Where are you going?\" asked Ben. \"To the lake,\" said Clara.", "title": "Walk"},
        {"text": "", "title": "Empty"},
        {"text": "Zürich — 東京 — 👋🏽. Numbers: 1234 and 56.", "title": "Mixed"}]


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(DOCS):
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            if i == 1:
                f.write("\n")  # blank lines are skipped
    return str(path)


def read(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def test_documents_with_eod_and_identical_output_for_any_worker_count(tmp_path, jsonl):
    tok = GPT2BPETokenizer(VOCAB, MERGES)
    outs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        result = preprocess(["--input", jsonl, "--output-prefix", prefix, "--append-eod", "--workers", str(workers),
                             "--quiet"] + GPT2_FLAGS)
        assert result == {"text": prefix + "_text_document"}
        outs[workers] = [open(result["text"] + ext, "rb").read() for ext in (".bin", ".idx")]
    assert outs[1] == outs[2]
    ds, seqs = read(str(tmp_path / "w1_text_document"))
    assert ds.dtype == np.uint16
    # the empty text is a document with no sequences, as in Megatron
    assert list(ds.document_indices) == [0, 1, 2, 2, 3]
    texts = [d["text"] for d in DOCS if d["text"]]
    for seq, text in zip(seqs, texts):
        assert seq[-1] == tok.eod and seq[:-1] == tok.tokenize(text)
        assert tok.detokenize(seq[:-1]) == text


def test_several_json_keys_and_sentence_splitting(tmp_path, jsonl):
    prefix = str(tmp_path / "out")
    result = preprocess(["--input", jsonl, "--output-prefix", prefix, "--json-keys", "text", "title",
                         "--split-sentences", "--workers", "1", "--quiet"] + GPT2_FLAGS)
    assert result == {"text": prefix + "_text_sentence", "title": prefix + "_title_sentence"}
    tok = GPT2BPETokenizer(VOCAB, MERGES)
    ds, seqs = read(result["text"])
    assert list(ds.document_indices) == [0, 1, 3, 3, 5]  # the dialogue and the mixed text have two sentences
    assert tok.detokenize(seqs[1]) == "\"Where are you going?\" asked Ben."
    assert tok.detokenize(seqs[2]) == "\"To the lake,\" said Clara."
    _, titles = read(result["title"])
    assert [tok.detokenize(t) for t in titles] == [d["title"] for d in DOCS]
    assert simple_sentence_split("One. Two!  Three? four. 5 rings.") == ["One.", "Two!", "Three? four.", "5 rings."]
    assert "".join(simple_sentence_split("A b. C d.\nE.", keep_newlines=True)) == "A b. C d.\nE."


def test_null_tokenizer_and_int32_for_large_vocabularies(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["1 2 3", "70000 5"]) + "\n")
    prefix = str(tmp_path / "ids")
    out = preprocess(["--input", str(path), "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
                      "--vocab-size", "80000", "--append-eod", "--workers", "1", "--quiet"])["text"]
    ds, seqs = read(out)
    assert ds.dtype == np.int32 and seqs == [[1, 2, 3, 79999], [70000, 5, 79999]]  # 0.19: EOD = N - 1


def test_null_tokenizer_writes_the_bytes_megatron_core_019_writes(tmp_path):
    # space-separated ids, NullTokenizer --vocab-size 257 --append-eod: Megatron-Core 0.19 ends every document
    # with EOD = 256 (0.15 wrote 257); ids are uint16 below 65500 ids.
    docs = ["3 1 4 1 5", "9 2 6", "255 0"]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = str(tmp_path / "ids")
    out = preprocess(["--input", str(path), "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
                      "--vocab-size", "257", "--append-eod", "--workers", "1", "--quiet"])["text"]
    expected = b"".join(np.array([int(x) for x in d.split()] + [256], "<u2").tobytes() for d in docs)
    with open(out + ".bin", "rb") as f:
        assert f.read() == expected
    _, seqs = read(out)
    assert seqs == [[3, 1, 4, 1, 5, 256], [9, 2, 6, 256], [255, 0, 256]]
    # the older files: --vocab-size 258 gives 0.15's EOD 257 (or name the id with --null-tokenizer-eod-id)
    old = preprocess(["--input", str(path), "--output-prefix", str(tmp_path / "old"), "--tokenizer-type",
                      "NullTokenizer", "--vocab-size", "258", "--append-eod", "--workers", "1", "--quiet"])["text"]
    assert read(old)[1][0][-1] == 257


def test_clear_errors(tmp_path, jsonl):
    with pytest.raises(FileNotFoundError, match="--input .*missing.jsonl"):
        preprocess(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"),
                    "--workers", "1"] + GPT2_FLAGS)
    with pytest.raises(ValueError, match=r"docs.jsonl:1: no key 'body'.*--json-keys"):
        preprocess(["--input", jsonl, "--output-prefix", str(tmp_path / "o"), "--json-keys", "body",
                    "--workers", "1", "--quiet"] + GPT2_FLAGS)
    with pytest.raises(SystemExit):
        preprocess(["--input", jsonl, "--output-prefix", str(tmp_path / "o")] + GPT2_FLAGS)  # --workers required


def test_command_line_wrapper_shows_progress(tmp_path, jsonl):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", jsonl,
                          "--output-prefix", str(tmp_path / "cli"), "--append-eod", "--workers", "1",
                          "--log-interval", "1"] + GPT2_FLAGS, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Processed 4 documents (" in out.stderr and "Wrote 4 documents" in out.stderr
    assert IndexedDataset(str(tmp_path / "cli_text_document")).document_indices.tolist() == [0, 1, 2, 2, 3]


def test_bundled_example_data_regenerates_byte_for_byte(tmp_path):
    prefix = build_example_data(str(tmp_path))
    for name in ("corpus.jsonl", "vocab.json", "merges.txt", "corpus_text_document.bin", "corpus_text_document.idx"):
        with open(os.path.join(EXAMPLE, name), "rb") as shipped, open(os.path.join(str(tmp_path), name), "rb") as new:
            assert shipped.read() == new.read(), name
    ds = IndexedDataset(prefix)
    assert len(ds) == 1500 and len(generate_corpus(3)) == 3
    total = sum(os.path.getsize(os.path.join(EXAMPLE, f)) for f in os.listdir(EXAMPLE)
                if os.path.isfile(os.path.join(EXAMPLE, f)))
    assert total < 2 * 2**20
