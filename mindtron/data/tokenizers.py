"""Tokenizers with Megatron-Core 0.19's surface (`vocab_size`, `eod`, `tokenize(text) -> ids`, `detokenize`).

`build_tokenizer(args)` picks one from `--tokenizer-type`, defining the vocabulary size, EOD and special ids
as Megatron-Core 0.19's `megatron/core/tokenizers` does:

GPT2BPETokenizer          byte-level BPE from `--vocab-file` (vocab.json) and `--merge-file` (merges.txt) with
                          GPT-2's pre-tokenisation (0.19 runs Hugging Face's "gpt2" tokenizer on these files):
                          EOD = `<|endoftext|>` (appended after the vocabulary if the file lacks it), special
                          tokens in the text (`<|endoftext|>`, `--tokenizer-special-tokens`) are single ids;
                          no extra packages.
NullTokenizer             ids written as text ("5 17 3"); `--vocab-size N` gives N ids, EOD = N - 1 unless
                          `--null-tokenizer-eod-id`, pad `--null-tokenizer-pad-id` (-1: none). Megatron-Core
                          0.15 and earlier had N + 1 ids with EOD = N: pass `--vocab-size N+1` for that.
HuggingFaceTokenizer      `transformers.AutoTokenizer` from `--tokenizer-model` (needs `transformers`); EOD is
                          its eos, `--tokenizer-special-tokens` are added after its vocabulary.
SentencePieceTokenizer,   one SentencePiece wrapper for the three names (needs `sentencepiece`): the model's
GPTSentencePieceTokenizer, pieces are the vocabulary, EOD is the model's eos, no BOS is prepended (0.19; 0.15's
Llama2Tokenizer           Llama2Tokenizer prepended one); `--tokenizer-sentencepiece-legacy` with
                          `--tokenizer-special-tokens` appends special tokens matched literally in the text.

The model's embedding uses the padded vocabulary: the tokenizer's `vocab_size` rounded up to a multiple of
`--make-vocab-size-divisible-by x --tensor-model-parallel-size` (`vocab_size_with_padding`), unless
`--no-pad-vocab-size`.
"""
from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex

logger = logging.getLogger("mindtron.data")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenisation: lower-case English contractions, optionally space-led runs of letters, of
digits and of other symbols, then whitespace (a whitespace run before a word leaves its last space to
the word)."""

EOD_TOKEN = "<|endoftext|>"

SUPPORTED_TYPES = ("GPT2BPETokenizer", "NullTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer", "Llama2Tokenizer")
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Bytes that are printable, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the remaining 68 bytes (controls, space, ...) take the characters 256, 257, ... in byte order.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def pretokenize(text: str, pattern=None) -> List[str]:
    """Split text into the pieces BPE runs on (GPT-2's pattern by default)."""
    return (pattern or _GPT2_RE).findall(text)


_GPT2_RE = regex.compile(GPT2_PATTERN)


class MegatronTokenizerBase:
    """Shared surface: `tokenize`, `detokenize`, `vocab_size`, `eod`; `unique_identifiers` for cache keys."""

    def __init__(self, *inputs, **options):
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [str(x) for x in inputs],
                                   **{k: str(v) for k, v in options.items()}}

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def cls(self) -> int:
        return -1

    @property
    def sep(self) -> int:
        return -1

    @property
    def mask(self) -> int:
        return -1


def _need_file(path: Optional[str], flag: str, what: str) -> str:
    if not path:
        raise ValueError(f"{flag} is required for {what}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file ({what})")
    return path


class GPT2BPETokenizer(MegatronTokenizerBase):
    """GPT-2's byte-level BPE (Megatron's `_GPT2BPETokenizer`).

    Text is split with `GPT2_PATTERN`; each piece's UTF-8 bytes are mapped to characters with
    `bytes_to_unicode`; adjacent symbols are merged, lowest merge rank first, until no ranked pair is left;
    the symbols are looked up in vocab.json (unknown symbols become id 0, as in Megatron). Decoding maps the
    characters back to bytes and decodes UTF-8 with replacement, so any text round-trips when the vocabulary
    holds all 256 byte symbols.
    """

    def __init__(self, vocab_file: str, merge_file: str, special_tokens: Sequence[str] = ()):
        _need_file(vocab_file, "--vocab-file", "GPT2BPETokenizer's vocab.json")
        _need_file(merge_file, "--merge-file", "GPT2BPETokenizer's merges.txt")
        super().__init__(vocab_file, merge_file)
        with open(vocab_file, "r", encoding="utf-8") as f:
            try:
                self.encoder: Dict[str, int] = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"--vocab-file {vocab_file}: not a JSON vocabulary ({err})") from None
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        with open(merge_file, "r", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Megatron skips the first line (the "#version" header) and the text after the last newline
        self.bpe_ranks = {tuple(line.split()): rank for rank, line in enumerate(lines[1:-1])}
        # Megatron-Core 0.19 runs Hugging Face's "gpt2" tokenizer on these files: <|endoftext|> is EOD, and a
        # special token the vocabulary lacks is added after it, with the next id.
        self.special_tokens = [EOD_TOKEN] + [t for t in special_tokens if t != EOD_TOKEN]
        for token in self.special_tokens:
            if token not in self.encoder:
                self.encoder[token] = len(self.encoder)
                self.decoder[self.encoder[token]] = token
        self.eod_id = self.encoder[EOD_TOKEN]
        # special tokens in the text are single ids (longest first, as Hugging Face's added-token split)
        self._special_re = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(
            self.special_tokens, key=len, reverse=True)) + ")")
        self._cache: Dict[str, Tuple[str, ...]] = {}

    def bpe(self, piece: str) -> Tuple[str, ...]:
        """Merge the characters of one byte-mapped piece into vocabulary symbols."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = list(piece)
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged: List[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        if len(self._cache) < 200_000:
            self._cache[piece] = result
        return result

    def tokens(self, text: str) -> List[str]:
        """The BPE symbols of `text` (byte-mapped strings)."""
        out: List[str] = []
        for piece in _GPT2_RE.findall(text):
            out.extend(self.bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return out

    def tokenize(self, text: str) -> List[int]:
        """Text -> token ids; special tokens written in the text become their own ids."""
        get = self.encoder.get
        ids: List[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self.encoder[part])
            elif part:
                ids.extend(get(t, 0) for t in self.tokens(part))
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Token ids -> text (invalid UTF-8 becomes U+FFFD); special tokens come back as written."""
        out, chars = [], []
        for i in ids:
            symbol = self.decoder[int(i)]
            if symbol in self.special_tokens:
                out.append(self._bytes_to_text(chars) + symbol)
                chars = []
            else:
                chars.append(symbol)
        return "".join(out) + self._bytes_to_text(chars)

    def _bytes_to_text(self, symbols: List[str]) -> str:
        return bytes(self.byte_decoder[c] for c in "".join(symbols)).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self.decoder

    @property
    def eod(self) -> int:
        return self.eod_id


class NullTokenizer(MegatronTokenizerBase):
    """Ids written as space-separated integers (Megatron-Core 0.19's NullTokenizer).

    `--vocab-size N` gives N ids, and EOD is the last one, N - 1, unless `eod_id` (--null-tokenizer-eod-id)
    names another; `pad_id` (--null-tokenizer-pad-id) is -1 for "no pad token". Megatron-Core 0.15 and
    earlier gave N + 1 ids with EOD = N; `NullTokenizer(N + 1)` reproduces that.
    """

    def __init__(self, vocab_size: int, eod_id: Optional[int] = None, pad_id: int = -1):
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        super().__init__(None, vocab_size=vocab_size, eod_id=eod_id, pad_id=pad_id)
        self._vocab_size = int(vocab_size)
        self._eod_id = self._vocab_size - 1 if eod_id is None else int(eod_id)
        if not 0 <= self._eod_id < self._vocab_size:
            raise ValueError(f"--null-tokenizer-eod-id {eod_id} is outside the vocabulary 0..{self._vocab_size - 1} "
                             "(--vocab-size)")
        self._pad_id = int(pad_id)

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def pad(self) -> int:
        return self._pad_id


class HuggingFaceTokenizer(MegatronTokenizerBase):
    """`transformers.AutoTokenizer.from_pretrained(--tokenizer-model)` as Megatron-Core 0.19 wraps it: a missing
    sep token becomes eos (or eos becomes sep), a missing bos becomes cls and vice versa,
    `--tokenizer-special-tokens` are added (new ones after the vocabulary); EOD is the eos token."""

    def __init__(self, pretrained_model_name_or_path: str, vocab_file: Optional[str] = None,
                 merges_file: Optional[str] = None, special_tokens: Sequence[str] = (), use_fast: bool = True,
                 trust_remote_code: bool = False, include_special_tokens: bool = True):
        if not pretrained_model_name_or_path:
            raise ValueError("--tokenizer-model is required for HuggingFaceTokenizer (a local directory or hub name)")
        super().__init__(pretrained_model_name_or_path, special_tokens=list(special_tokens), use_fast=use_fast,
                         include_special_tokens=include_special_tokens)
        try:
            import transformers
        except ImportError:
            raise ImportError("HuggingFaceTokenizer needs the optional package 'transformers' "
                              "(pip install transformers)") from None
        files = {k: v for k, v in (("vocab_file", vocab_file), ("merges_file", merges_file)) if v}
        self._tokenizer = tok = transformers.AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path=pretrained_model_name_or_path, use_fast=use_fast,
            trust_remote_code=trust_remote_code, **files)
        extra: Dict[str, object] = {}
        if tok.sep_token is None and tok.eos_token:
            extra["sep_token"] = tok.eos_token
        elif tok.eos_token is None and tok.sep_token:
            extra["eos_token"] = tok.sep_token
        if tok.bos_token is None and tok.cls_token:
            extra["bos_token"] = tok.cls_token
        if tok.cls_token is None and tok.bos_token:
            extra["cls_token"] = tok.bos_token
        if special_tokens:
            extra["additional_special_tokens"] = list(special_tokens)
        tok.add_special_tokens(extra)
        self.include_special_tokens = include_special_tokens
        self._vocab = tok.get_vocab()
        self._inv_vocab = {i: t for t, i in self._vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        if self.include_special_tokens:
            return list(self._tokenizer(text).input_ids)
        return list(self._tokenizer.convert_tokens_to_ids(self._tokenizer.tokenize(text)))

    def detokenize(self, ids: Iterable[int]) -> str:
        tokens = [t for t in self._tokenizer.convert_ids_to_tokens(list(ids)) if t is not None]
        if not self.include_special_tokens:
            tokens = [t for t in tokens if t not in self._tokenizer.all_special_tokens]
        return self._tokenizer.convert_tokens_to_string(tokens)

    def _id(self, token) -> Optional[int]:
        return None if token is None else self._tokenizer.convert_tokens_to_ids(token)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def vocab(self):
        return self._vocab

    @property
    def inv_vocab(self):
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._id(self._tokenizer.eos_token)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> int:
        return self._id(self._tokenizer.bos_token)

    @property
    def pad(self) -> int:
        return self._id(self._tokenizer.pad_token)

    @property
    def cls(self) -> int:
        return self._id(self._tokenizer.cls_token)

    @property
    def sep(self) -> int:
        return self._id(self._tokenizer.sep_token)

    @property
    def mask(self) -> int:
        return self._id(self._tokenizer.mask_token)


def _load_sentencepiece(model_file: str):
    _need_file(model_file, "--tokenizer-model", "a SentencePiece model")
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("SentencePiece tokenizers need the optional package 'sentencepiece' "
                          "(pip install sentencepiece)") from None
    return sentencepiece.SentencePieceProcessor(model_file=model_file)


_EXTRA_SPACE = "\u262f"  # a stand-in for a repeated space, unlikely to be a piece (Megatron's choice)


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece model as Megatron-Core 0.19 wraps it, for SentencePieceTokenizer,
    GPTSentencePieceTokenizer and Llama2Tokenizer alike.

    The vocabulary is the model's pieces; EOD is the model's eos, pad/bos its pad/bos (-1 when the model has
    none); `tokenize` is the model's encoding, no BOS prepended. `ignore_extra_whitespaces=False`
    (--no-tokenizer-sentencepiece-ignore-extra-whitespaces) keeps repeated spaces as pieces for a model that
    collapses them. With `legacy` (--tokenizer-sentencepiece-legacy), `special_tokens`
    (--tokenizer-special-tokens) are matched literally in the text: a token the model lacks gets the next id
    after its pieces, one it has keeps its piece id, and the model's "▁" right after a special token is dropped.
    """

    def __init__(self, model_file: str, special_tokens: Optional[Sequence[str]] = None, legacy: bool = False,
                 ignore_extra_whitespaces: bool = True):
        self.tokenizer = _load_sentencepiece(model_file)
        super().__init__(model_file, special_tokens=list(special_tokens or []), legacy=legacy,
                         ignore_extra_whitespaces=ignore_extra_whitespaces)
        self.original_vocab_size = self._vocab_size = self.tokenizer.get_piece_size()
        self.legacy, self.ignore_extra_whitespaces = legacy, ignore_extra_whitespaces
        self.special_token_to_id: Dict[str, int] = {}
        self.id_to_special_token: Dict[int, str] = {}
        self._separator_id = self.tokenizer.piece_to_id("\u2581")
        if special_tokens:
            if not legacy:
                raise ValueError("--tokenizer-special-tokens with a SentencePiece model needs "
                                 "--tokenizer-sentencepiece-legacy (Megatron-Core 0.19 adds special tokens only "
                                 "in its legacy wrapper)")
            unk = self.tokenizer.unk_id()
            for token in special_tokens:
                piece = self.tokenizer.piece_to_id(token)
                if piece == unk and token not in self.special_token_to_id:
                    self.special_token_to_id[token] = self._vocab_size
                    self.id_to_special_token[self._vocab_size] = token
                    self._vocab_size += 1
                elif piece != unk:
                    self.special_token_to_id[token] = piece
                    self.id_to_special_token[piece] = token
        self.removed_extra_spaces = self.tokenizer.encode_as_pieces("x  y") == self.tokenizer.encode_as_pieces("x y")

    def _keep_spaces(self) -> bool:
        return self.removed_extra_spaces and not self.ignore_extra_whitespaces

    def _encode(self, text: str) -> List[int]:
        if not self._keep_spaces():
            return list(self.tokenizer.encode_as_ids(text))
        ids: List[int] = []
        for part in text.split(_EXTRA_SPACE):
            if part:  # the stand-in closes each part and is dropped again
                ids.extend(self.tokenizer.encode_as_ids(part + _EXTRA_SPACE)[:-1])
        return ids

    def tokenize(self, text: str) -> List[int]:
        if self._keep_spaces():
            text = regex.sub(r"(?<= )(?= )|^ | $", f" {_EXTRA_SPACE} ", text).rstrip()
        if not self.legacy:
            return self._encode(text)
        ids: List[int] = []
        pos = 0
        while True:
            hits = [(text.find(t, pos), t) for t in self.special_token_to_id]
            hits = [(i, t) for i, t in hits if i >= 0]
            if not hits:
                break
            at, token = min(hits)  # the earliest special token (the first listed on a tie)
            piece_ids = list(self.tokenizer.encode(text[pos:at]))
            if ids and ids[-1] in self.id_to_special_token and piece_ids and piece_ids[0] == self._separator_id:
                piece_ids.pop(0)
            ids.extend(piece_ids)
            ids.append(self.special_token_to_id[token])
            pos = at + len(token)
        return ids + self._encode(text[pos:])

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if not self.legacy:
            return self.tokenizer.decode_ids(ids)
        text, last = "", 0
        for k, i in enumerate(ids):
            if i in self.id_to_special_token:
                text += self.tokenizer.decode_ids(ids[last:k]) + " " + self.id_to_special_token[i] + " "
                last = k + 1
        return (text + self.tokenizer.decode_ids(ids[last:])).strip()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.tokenizer.eos_id()

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_id()

    @property
    def bos(self) -> int:
        return self.tokenizer.bos_id()

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_id()


def vocab_size_with_padding(orig_vocab_size: int, args=None, make_vocab_size_divisible_by: Optional[int] = None,
                            tensor_model_parallel_size: Optional[int] = None) -> int:
    """Megatron's padded vocabulary: `orig_vocab_size` rounded up to a multiple of
    make_vocab_size_divisible_by x tensor_model_parallel_size (defaults 128 and 1, or taken from `args`)."""
    if make_vocab_size_divisible_by is None:
        make_vocab_size_divisible_by = getattr(args, "make_vocab_size_divisible_by", None) or 128
    if tensor_model_parallel_size is None:
        tensor_model_parallel_size = getattr(args, "tensor_model_parallel_size", None) or 1
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    if multiple < 1:
        raise ValueError(f"--make-vocab-size-divisible-by x --tensor-model-parallel-size must be positive, got "
                         f"{multiple}")
    return -(-int(orig_vocab_size) // multiple) * multiple


_GLOBAL_TOKENIZER = None


def build_tokenizer(args, **kwargs) -> MegatronTokenizerBase:
    """The tokenizer `--tokenizer-type` names, built from the usual file flags.

    Sets `args.padded_vocab_size` (when it is missing or None, and unless --no-pad-vocab-size) to
    `vocab_size_with_padding(tokenizer.vocab_size, args)`, as Megatron-Core 0.19 does. Without `--tokenizer-type` it infers GPT2BPETokenizer from `--vocab-file` + `--merge-file`, or
    NullTokenizer from `--vocab-size`.
    """
    global _GLOBAL_TOKENIZER
    kind = getattr(args, "tokenizer_type", None)
    if kind is None:
        if getattr(args, "vocab_file", None) and getattr(args, "merge_file", None):
            kind = "GPT2BPETokenizer"
        elif getattr(args, "vocab_size", None):
            kind = "NullTokenizer"
        else:
            raise ValueError("--tokenizer-type is required (e.g. GPT2BPETokenizer with --vocab-file and "
                             "--merge-file, or NullTokenizer with --vocab-size)")
    special = list(getattr(args, "special_tokens", None) or [])
    if kind == "GPT2BPETokenizer":
        for flag, name in (("--vocab-file", "vocab_file"), ("--merge-file", "merge_file")):
            if not getattr(args, name, None):
                raise ValueError(f"GPT2BPETokenizer needs {flag}")
        tokenizer = GPT2BPETokenizer(args.vocab_file, args.merge_file, special)
    elif kind == "NullTokenizer":
        if getattr(args, "vocab_size", None) is None:
            raise ValueError("NullTokenizer needs --vocab-size (the number of ids; EOD is the last one)")
        tokenizer = NullTokenizer(args.vocab_size, getattr(args, "null_tokenizer_eod_id", None),
                                  getattr(args, "null_tokenizer_pad_id", -1))
    elif kind == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(
            getattr(args, "tokenizer_model", None), getattr(args, "vocab_file", None),
            getattr(args, "merge_file", None), special,
            use_fast=not getattr(args, "tokenizer_hf_no_use_fast", False),
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
            include_special_tokens=not getattr(args, "tokenizer_hf_no_include_special_tokens", False))
    elif kind in SENTENCEPIECE_TYPES:
        tokenizer = SentencePieceTokenizer(
            getattr(args, "tokenizer_model", None), special or None,
            legacy=bool(getattr(args, "tokenizer_sentencepiece_legacy", False)),
            ignore_extra_whitespaces=getattr(args, "tokenizer_sentencepiece_ignore_extra_whitespaces", True))
    else:
        raise ValueError(f"--tokenizer-type {kind!r} is not supported by mindtron; use one of "
                         f"{', '.join(SUPPORTED_TYPES)}")
    if getattr(args, "padded_vocab_size", None) is None:
        if getattr(args, "pad_vocab_size", True):
            padded = vocab_size_with_padding(tokenizer.vocab_size, args)
            logger.info("padded vocab (size: %d) with %d dummy tokens (new size: %d)", tokenizer.vocab_size,
                        padded - tokenizer.vocab_size, padded)
        else:  # --no-pad-vocab-size: the embedding has exactly the tokenizer's ids
            padded = tokenizer.vocab_size
        try:
            args.padded_vocab_size = padded
        except AttributeError:
            pass
    _GLOBAL_TOKENIZER = tokenizer
    return tokenizer


def get_tokenizer() -> Optional[MegatronTokenizerBase]:
    """The tokenizer the last `build_tokenizer` call made (None before any)."""
    return _GLOBAL_TOKENIZER
