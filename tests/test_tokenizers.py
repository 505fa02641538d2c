"""Tokenizers: GPT-2 byte-level BPE (pattern edge cases, merges, round trips), NullTokenizer, the optional
HuggingFace/SentencePiece wrappers, build_tokenizer and the padded vocabulary, and the BPE trainer."""
import importlib.util
import json
import os
import sys
import types

import pytest

from mindtron.data.bpe_train import save_vocabulary, train_bpe
from mindtron.data.tokenizers import (GPT2BPETokenizer, NullTokenizer, SentencePieceTokenizer, build_tokenizer,
                                      bytes_to_unicode, pretokenize, vocab_size_with_padding)

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "gpt", "data")


@pytest.fixture(scope="module")
def bundled():
    return GPT2BPETokenizer(os.path.join(EXAMPLE, "vocab.json"), os.path.join(EXAMPLE, "merges.txt"))


def test_byte_map_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[0xFF] == "ÿ"
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    assert all(not c.isspace() for c in table.values())


@pytest.mark.parametrize("text,pieces", [
    ("I'm don't we'll they've she'd it's you're",
     ["I", "'m", " don", "'t", " we", "'ll", " they", "'ve", " she", "'d", " it", "'s", " you", "'re"]),
    ("DON'T", ["DON", "'", "T"]),                      # contractions are matched in lower case only
    ("abc123 4567,89", ["abc", "123", " 4567", ",", "89"]),
    ("a   b", ["a", "  ", " b"]),                      # a whitespace run leaves its last space to the word
    ("end.   ", ["end", ".", "   "]),
    ("line1\n\nline2", ["line", "1", "\n", "\n", "line", "2"]),
    ("\t tab", ["\t", " tab"]),
    ("café naïve 東京 Ελληνικά", ["café", " naïve", " 東京", " Ελληνικά"]),
    ("hi 👋🏽!", ["hi", " 👋🏽!"]),
    ("x ٣٤ ½", ["x", " ٣٤", " ½"]),                    # any Unicode digits / numerics
    ("  'quoted'", [" ", " '", "quoted", "'"]),
])
def test_gpt2_pretokenization_edge_cases(text, pieces):
    assert pretokenize(text) == pieces
    assert "".join(pieces) == text


def tiny_bpe(tmp_path, merges, extra_tokens=()):
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for t in extra_tokens:
        vocab[t] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    save_vocabulary(vocab, merges, str(tmp_path))
    return GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def test_bpe_merges_by_rank(tmp_path):
    tok = tiny_bpe(tmp_path, [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
                              ("Ġw", "or"), ("b", "c"), ("a", "b")])
    assert tok.tokens("hello world") == ["hello", "Ġwor", "l", "d"]
    assert tok.tokens("abc") == ["a", "bc"]  # the lower-ranked pair wins even when it is not leftmost
    ids = tok.tokenize("hello world")
    assert ids == [tok.vocab["hello"], tok.vocab["Ġwor"], ord("l"), ord("d")]
    assert tok.detokenize(ids) == "hello world"
    assert tok.eod == tok.vocab_size - 1 and tok.detokenize([tok.eod]) == "<|endoftext|>"


def test_merges_file_header_and_megatron_line_handling(tmp_path):
    tok = tiny_bpe(tmp_path, [("a", "b")])
    assert tok.bpe_ranks == {("a", "b"): 0}  # "#version" line skipped
    with open(tmp_path / "merges.txt", "a", encoding="utf-8") as f:
        f.write("c d")  # no trailing newline: Megatron ignores such a last line, and so do we
    tok = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert ("c", "d") not in tok.bpe_ranks


@pytest.mark.parametrize("text", [
    "The hare is a heavy animal that lives in open fields.",
    "Dear Rosa,\n\nI'm writing to you.\r\n\tYours,   Ben  ",
    "Zürich, São Paulo, Kraków, Ελλάδα, 東京, Москва — “quotes” and ‘apostrophes’",
    "emoji 👋🏽🎉 math ∑∫√ control \x00\x01\x7f nbsp\u00a0here",
    "1234567890 3.14159 -42 1e10 0x1F",
    "", " ", "\n\n\n",
])
def test_round_trips_any_text(bundled, text):
    ids = bundled.tokenize(text)
    assert all(0 <= i < bundled.vocab_size for i in ids)
    assert bundled.detokenize(ids) == text


def test_bundled_vocabulary(bundled):
    assert bundled.vocab_size == 1024 and bundled.eod == 1023
    short = bundled.tokenize(" the market")
    assert len(short) <= 3  # frequent corpus words are single tokens
    assert bundled.detokenize([0xC3]) == "\ufffd"  # half a UTF-8 character decodes with replacement


def test_null_tokenizer_follows_megatron_core_019():
    tok = NullTokenizer(100)
    assert tok.vocab_size == 100 and tok.eod == 99 and tok.pad == -1  # 0.19: N ids, the last is EOD
    assert tok.tokenize("5 17 3") == [5, 17, 3] and tok.detokenize([5, 17, 3]) == "5 17 3"
    tok = NullTokenizer(100, eod_id=0, pad_id=1)  # --null-tokenizer-eod-id / --null-tokenizer-pad-id
    assert (tok.vocab_size, tok.eod, tok.pad) == (100, 0, 1)
    old = NullTokenizer(100 + 1)  # how to reproduce Megatron-Core 0.15's --vocab-size 100
    assert (old.vocab_size, old.eod) == (101, 100)
    with pytest.raises(ValueError, match="--null-tokenizer-eod-id 100 is outside the vocabulary 0..99"):
        NullTokenizer(100, eod_id=100)


def args_for(**kw):
    base = dict(tokenizer_type=None, vocab_file=None, merge_file=None, vocab_size=None, tokenizer_model=None,
                make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, padded_vocab_size=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_build_tokenizer_selects_and_pads():
    vocab, merges = os.path.join(EXAMPLE, "vocab.json"), os.path.join(EXAMPLE, "merges.txt")
    args = args_for(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges,
                    tensor_model_parallel_size=2)
    tok = build_tokenizer(args)
    assert isinstance(tok, GPT2BPETokenizer) and args.padded_vocab_size == 1024
    args = args_for(tokenizer_type="NullTokenizer", vocab_size=127)
    assert build_tokenizer(args).eod == 126 and args.padded_vocab_size == 128
    args = args_for(tokenizer_type="NullTokenizer", vocab_size=129, null_tokenizer_eod_id=5, pad_vocab_size=False)
    assert build_tokenizer(args).eod == 5 and args.padded_vocab_size == 129  # --no-pad-vocab-size
    args = args_for(vocab_size=1000, tensor_model_parallel_size=3)  # type inferred from --vocab-size
    assert isinstance(build_tokenizer(args), NullTokenizer) and args.padded_vocab_size == 1152
    args = args_for(tokenizer_type="NullTokenizer", vocab_size=10, padded_vocab_size=256)
    build_tokenizer(args)
    assert args.padded_vocab_size == 256  # a value already set (e.g. from a checkpoint) is kept


@pytest.mark.parametrize("orig,divisible,tp,padded", [(50257, 128, 1, 50304), (50257, 128, 8, 51200),
                                                      (1024, 128, 1, 1024), (101, 1, 1, 101), (101, 8, 4, 128)])
def test_padded_vocab_rule(orig, divisible, tp, padded):
    assert vocab_size_with_padding(orig, make_vocab_size_divisible_by=divisible,
                                   tensor_model_parallel_size=tp) == padded


def test_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type is required"):
        build_tokenizer(args_for())
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --merge-file"):
        build_tokenizer(args_for(tokenizer_type="GPT2BPETokenizer", vocab_file="v.json"))
    with pytest.raises(FileNotFoundError, match="--vocab-file .*nope.json"):
        build_tokenizer(args_for(tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "nope.json"),
                                 merge_file=str(tmp_path / "m.txt")))
    with pytest.raises(ValueError, match="not supported.*GPT2BPETokenizer"):
        build_tokenizer(args_for(tokenizer_type="BertWordPieceCase"))
    with pytest.raises(ValueError, match="not supported.*GPT2BPETokenizer"):
        build_tokenizer(args_for(tokenizer_type="TikTokenizer", tokenizer_model="x"))


def test_gpt2_special_tokens_as_megatron_core_019(tmp_path, bundled):
    # 0.19 tokenizes with Hugging Face's gpt2 tokenizer: special tokens in the text are single ids, and a
    # special token the vocabulary lacks is appended after it.
    eod = bundled.eod
    assert bundled.tokenize("a<|endoftext|>b") == bundled.tokenize("a") + [eod] + bundled.tokenize("b")
    assert bundled.detokenize(bundled.tokenize("x <|endoftext|> y")) == "x <|endoftext|> y"
    vocab, merges = os.path.join(EXAMPLE, "vocab.json"), os.path.join(EXAMPLE, "merges.txt")
    extra = build_tokenizer(args_for(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges,
                                     special_tokens=["<tool>", "<|endoftext|>"]))
    assert extra.vocab_size == 1025 and extra.encoder["<tool>"] == 1024 and extra.eod == eod
    assert extra.tokenize("hi<tool>") == bundled.tokenize("hi") + [1024]
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    small = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert small.vocab_size == 3 and small.eod == 2  # <|endoftext|> appended after the two entries


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    import io

    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog met a bird"] * 30
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=40,
                                             model_type="bpe", minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(model.getvalue())
    return str(path), sentencepiece.SentencePieceProcessor(model_file=str(path))


def test_sentencepiece_tokenizers_follow_megatron_core_019(sp_model):
    path, sp = sp_model
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        args = args_for(tokenizer_type=kind, tokenizer_model=path)
        tok = build_tokenizer(args)
        # the model's pieces are the vocabulary; EOD = eos; no BOS in front (0.15's Llama2Tokenizer had one)
        assert tok.vocab_size == sp.get_piece_size() == 40 and args.padded_vocab_size == 128
        assert (tok.eod, tok.bos, tok.pad) == (sp.eos_id(), sp.bos_id(), sp.pad_id()) == (2, 1, -1)
        assert tok.tokenize("the cat sat") == sp.encode_as_ids("the cat sat")
        assert tok.detokenize(tok.tokenize("the cat sat")) == "the cat sat"
    with pytest.raises(ValueError, match="needs --tokenizer-sentencepiece-legacy"):
        build_tokenizer(args_for(tokenizer_type="SentencePieceTokenizer", tokenizer_model=path,
                                 special_tokens=["<x>"]))


def test_sentencepiece_legacy_special_tokens_and_extra_whitespace(sp_model):
    path, sp = sp_model
    piece = sp.id_to_piece(10)  # a piece the model has keeps its id
    tok = SentencePieceTokenizer(path, special_tokens=["<x>", piece], legacy=True)
    new, known = tok.special_token_to_id["<x>"], tok.special_token_to_id[piece]
    assert tok.vocab_size == 41 and new == 40 and known == 10
    ids = tok.tokenize("the<x> q<x> dog")
    # between two special tokens a leading lone "▁" is dropped (Megatron's chat-template fix); the tail is not
    assert sp.encode(" q")[0] == sp.piece_to_id("\u2581")
    assert ids == sp.encode("the") + [40] + sp.encode(" q")[1:] + [40] + sp.encode(" dog")
    assert tok.detokenize(sp.encode("the") + [40] + sp.encode(" dog")) == "the <x> dog"
    plain = SentencePieceTokenizer(path)
    keep = SentencePieceTokenizer(path, ignore_extra_whitespaces=False)
    assert plain.removed_extra_spaces and plain.tokenize("a  dog") == sp.encode_as_ids("a dog")
    assert keep.tokenize("a  dog") != plain.tokenize("a  dog")  # the repeated space is kept as pieces


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_huggingface_tokenizer_needs_transformers():
    with pytest.raises(ImportError, match="pip install transformers"):
        build_tokenizer(args_for(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="gpt2"))


def test_sentencepiece_tokenizer_needs_sentencepiece(tmp_path, monkeypatch):
    model = tmp_path / "tok.model"
    model.write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        with pytest.raises(ImportError, match="pip install sentencepiece"):
            build_tokenizer(args_for(tokenizer_type=kind, tokenizer_model=str(model)))
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer(args_for(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tmp_path / "x")))


def test_bpe_trainer_makes_a_working_vocabulary(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "Ünïcödé 東京 too"] * 5
    vocab, merges = train_bpe(texts, 300)
    assert len(vocab) <= 300 and vocab["<|endoftext|>"] == len(vocab) - 1
    table = bytes_to_unicode()
    assert all(vocab[table[b]] == b for b in range(256))
    assert all(a + b in vocab for a, b in merges) and len(vocab) == 256 + len(merges) + 1
    vocab_path, merges_path = save_vocabulary(vocab, merges, str(tmp_path))
    with open(merges_path, encoding="utf-8") as f:
        assert f.readline() == "#version: 0.2\n"
    tok = GPT2BPETokenizer(vocab_path, merges_path)
    for t in texts[:4] + ["unseen words ¿qué?"]:
        assert tok.detokenize(tok.tokenize(t)) == t
    assert len(tok.tokenize(" the cat")) == 2
    assert train_bpe(texts, 300) == (vocab, merges)  # deterministic
