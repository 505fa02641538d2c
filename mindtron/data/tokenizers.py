"""Tokenizers with Megatron's surface (`vocab_size`, `eod`, `tokenize(text) -> ids`, `detokenize(ids)`).

`build_tokenizer(args)` picks one from `--tokenizer-type`:

GPT2BPETokenizer          byte-level BPE from `--vocab-file` (vocab.json) and `--merge-file` (merges.txt),
                          GPT-2's pre-tokenisation pattern, `<|endoftext|>` as EOD; no extra packages.
NullTokenizer             ids written as text ("5 17 3"); `--vocab-size N` ids plus EOD = N.
HuggingFaceTokenizer      `transformers.AutoTokenizer` from `--tokenizer-model` (needs `transformers`).
SentencePieceTokenizer,   `--tokenizer-model` SentencePiece model (needs `sentencepiece`), with Megatron's
GPTSentencePieceTokenizer, special-token conventions for each variant.
Llama2Tokenizer

The model's embedding uses the padded vocabulary: the tokenizer's `vocab_size` rounded up to a multiple of
`--make-vocab-size-divisible-by x --tensor-model-parallel-size` (`vocab_size_with_padding`).
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

    def __init__(self, vocab_file: str, merge_file: str):
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
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"--vocab-file {vocab_file} has no {EOD_TOKEN!r} entry, which GPT2BPETokenizer uses "
                             "as the end-of-document token; add it (last id by convention)")
        self.eod_id = self.encoder[EOD_TOKEN]
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
        """Text -> token ids."""
        get = self.encoder.get
        return [get(t, 0) for t in self.tokens(text)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Token ids -> text (invalid UTF-8 becomes U+FFFD)."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

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
    """Ids written as space-separated integers; `vocab_size` ids of which the last is EOD
    (`--vocab-size N` gives ids 0..N-1 and EOD = N, so vocab_size = N + 1, as in Megatron)."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        super().__init__(None, vocab_size=vocab_size)
        self._size_without_eod = int(vocab_size)

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._size_without_eod


class HuggingFaceTokenizer(MegatronTokenizerBase):
    """`transformers.AutoTokenizer.from_pretrained(--tokenizer-model)`; EOD is its eos token."""

    def __init__(self, pretrained_model_name_or_path: str, trust_remote_code: bool = False, **kwargs):
        if not pretrained_model_name_or_path:
            raise ValueError("--tokenizer-model is required for HuggingFaceTokenizer (a local directory or hub name)")
        super().__init__(pretrained_model_name_or_path, **kwargs)
        try:
            import transformers
        except ImportError:
            raise ImportError("HuggingFaceTokenizer needs the optional package 'transformers' "
                              "(pip install transformers)") from None
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path=pretrained_model_name_or_path, trust_remote_code=trust_remote_code,
            **kwargs)
        self._vocab = self._tokenizer.get_vocab()
        self._inv_vocab = {i: t for t, i in self._vocab.items()}

    def tokenize(self, text: str, **kwargs) -> List[int]:
        return list(self._tokenizer(text, **kwargs).input_ids)

    def detokenize(self, ids: Iterable[int], **kwargs) -> str:
        return self._tokenizer.decode(list(ids), **kwargs)

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
        return self._tokenizer.eos_token_id

    @property
    def bos(self) -> int:
        return self._tokenizer.bos_token_id

    @property
    def pad(self) -> int:
        return self._tokenizer.pad_token_id


def _load_sentencepiece(model_file: str):
    _need_file(model_file, "--tokenizer-model", "a SentencePiece model")
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("SentencePiece tokenizers need the optional package 'sentencepiece' "
                          "(pip install sentencepiece)") from None
    return sentencepiece.SentencePieceProcessor(model_file=model_file)


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece model plus Megatron's special tokens <CLS>, <SEP>, <EOD>, <MASK> (and pad/bos/eos
    and `<extra_id_i>` when missing), appended after the model's pieces; special tokens in the text are
    matched literally and encoded as their own ids."""

    def __init__(self, model_file: str, vocab_extra_ids: int = 0):
        self.tokenizer = _load_sentencepiece(model_file)
        super().__init__(model_file, vocab_extra_ids=vocab_extra_ids)
        self._vocab = {self.tokenizer.id_to_piece(i): i for i in range(len(self.tokenizer))}
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        self._setup_special_tokens(vocab_extra_ids)

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            new = len(self._vocab)
            self._vocab[token], self._inv_vocab[new] = new, token
        self._special[token] = self._vocab[token]
        self._inv_special[self._vocab[token]] = token
        return self._vocab[token]

    def _piece_or(self, piece_id: int, fallback: str) -> str:
        try:
            return self.tokenizer.id_to_piece(piece_id)
        except (IndexError, ValueError):
            return fallback

    def _setup_special_tokens(self, vocab_extra_ids: int) -> None:
        self._special: Dict[str, int] = {}
        self._inv_special: Dict[int, str] = {}
        self._cls_id = self._add_special("<CLS>")
        self._sep_id = self._add_special("<SEP>")
        self._eod_id = self._add_special("<EOD>")
        self._mask_id = self._add_special("<MASK>")
        self._pad_id = self._add_special(self._piece_or(self.tokenizer.pad_id(), "<PAD>"))
        self._bos_id = self._add_special(self._piece_or(self.tokenizer.bos_id(), "<BOS>"))
        self._eos_id = self._add_special(self._piece_or(self.tokenizer.eos_id(), "<EOS>"))
        self._extra = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for t in self._extra:
            self._add_special(t)

    def tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        pos = 0
        while True:
            hits = [(text.find(t, pos), t) for t in self._special]
            hits = [(i, t) for i, t in hits if i >= 0]
            if not hits:
                break
            at, token = min(hits)
            ids.extend(self.tokenizer.encode_as_ids(text[pos:at]))
            ids.append(self._special[token])
            pos = at + len(token)
        ids.extend(self.tokenizer.encode_as_ids(text[pos:]))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        text, last = "", 0
        for k, i in enumerate(ids):
            if i in self._inv_special:
                text += self.tokenizer.decode_ids(ids[last:k]) + " " + self._inv_special[i] + " "
                last = k + 1
        return text + self.tokenizer.decode_ids(ids[last:])

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self):
        return self._vocab

    @property
    def inv_vocab(self):
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def eos(self) -> int:
        return self._eos_id

    @property
    def bos(self) -> int:
        return self._bos_id

    @property
    def pad(self) -> int:
        return self._pad_id

    @property
    def cls(self) -> int:
        return self._cls_id

    @property
    def sep(self) -> int:
        return self._sep_id

    @property
    def mask(self) -> int:
        return self._mask_id


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """A SentencePiece model used as is: no added tokens, EOD is the model's eos."""

    def __init__(self, model_file: str):
        super().__init__(model_file, 0)

    def _setup_special_tokens(self, vocab_extra_ids: int) -> None:
        self._special, self._inv_special = {}, {}
        self._pad_id, self._bos_id = self.tokenizer.pad_id(), self.tokenizer.bos_id()
        self._eos_id = self._eod_id = self.tokenizer.eos_id()
        self._cls_id = self._sep_id = self._mask_id = -1

    def tokenize(self, text: str) -> List[int]:
        return list(self.tokenizer.encode_as_ids(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode_ids([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Llama-2's SentencePiece model: `tokenize` prepends BOS by default, EOD is eos."""

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = list(self.tokenizer.encode(text))
        return ([self._bos_id] if bos else []) + ids + ([self._eos_id] if eos else [])


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

    Sets `args.padded_vocab_size` (when it is missing or None) to `vocab_size_with_padding(tokenizer.vocab_size,
    args)`. Without `--tokenizer-type` it infers GPT2BPETokenizer from `--vocab-file` + `--merge-file`, or
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
    if kind == "GPT2BPETokenizer":
        for flag, name in (("--vocab-file", "vocab_file"), ("--merge-file", "merge_file")):
            if not getattr(args, name, None):
                raise ValueError(f"GPT2BPETokenizer needs {flag}")
        tokenizer = GPT2BPETokenizer(args.vocab_file, args.merge_file)
    elif kind == "NullTokenizer":
        if getattr(args, "vocab_size", None) is None:
            raise ValueError("NullTokenizer needs --vocab-size (the number of ids before the EOD id)")
        tokenizer = NullTokenizer(args.vocab_size)
    elif kind == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(getattr(args, "tokenizer_model", None),
                                         trust_remote_code=bool(getattr(args, "trust_remote_code", False)), **kwargs)
    elif kind == "SentencePieceTokenizer":
        tokenizer = SentencePieceTokenizer(getattr(args, "tokenizer_model", None),
                                           vocab_extra_ids=int(getattr(args, "vocab_extra_ids", 0) or 0))
    elif kind == "GPTSentencePieceTokenizer":
        tokenizer = GPTSentencePieceTokenizer(getattr(args, "tokenizer_model", None))
    elif kind == "Llama2Tokenizer":
        tokenizer = Llama2Tokenizer(getattr(args, "tokenizer_model", None))
    else:
        raise ValueError(f"--tokenizer-type {kind!r} is not supported by mindtron; use one of "
                         f"{', '.join(SUPPORTED_TYPES)}")
    if getattr(args, "padded_vocab_size", None) is None:
        padded = vocab_size_with_padding(tokenizer.vocab_size, args)
        try:
            args.padded_vocab_size = padded
        except AttributeError:
            pass
        logger.info("padded vocab (size: %d) with %d dummy tokens (new size: %d)", tokenizer.vocab_size,
                    padded - tokenizer.vocab_size, padded)
    _GLOBAL_TOKENIZER = tokenizer
    return tokenizer


def get_tokenizer() -> Optional[MegatronTokenizerBase]:
    """The tokenizer the last `build_tokenizer` call made (None before any)."""
    return _GLOBAL_TOKENIZER
