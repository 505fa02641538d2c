"""Tokenise a JSON-lines corpus into Megatron `.bin/.idx` files (Megatron's `tools/preprocess_data.py`).

    python -m mindtron.data.preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

Each input line is a JSON object; the text under each `--json-keys` key (default "text") becomes one
document of `<output-prefix>_<key>_document.bin/.idx` (`..._sentence` with `--split-sentences`, where every
sentence is its own sequence). `--append-eod` ends each document with the tokenizer's EOD id (Megatron-Core
0.19's: a NullTokenizer's `--vocab-size N` writes EOD N - 1). The tokenizer flags are the training parser's. Token ids are
stored as uint16 when the vocabulary has fewer than 65500 ids, else int32, as Megatron does, and the files
are byte-compatible with Megatron's. Documents keep their input order whatever `--workers` is.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import regex

from mindtron.data.indexed_dataset import DType, IndexedDatasetBuilder
from mindtron.progress import Progress

# ------------------------------------------------------------------------------------------------------
# Sentence splitting (--split-sentences): NLTK punkt when it is installed with its data, else a rule:
# a sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace and an
# upper-case letter, digit or opening quote.
# ------------------------------------------------------------------------------------------------------
_SENTENCE_END = regex.compile(r"""(?<=[.!?]['"”’)\]]*)(\s+)(?=['"“‘(\[]?[\p{Lu}\p{N}])""")


def simple_sentence_split(text: str, keep_newlines: bool = False) -> List[str]:
    """Split text into sentences at terminal punctuation; with keep_newlines each sentence keeps the
    whitespace that followed it, so joining the sentences gives the text back."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end() if keep_newlines else m.start()
        pieces.append(text[start:end])
        start = m.end()
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _make_splitter(args):
    if not args.split_sentences:
        return None
    try:  # prefer NLTK's punkt when available locally (no downloads)
        import nltk  # noqa: F401
        from nltk.tokenize import sent_tokenize
        sent_tokenize("Probe. Sentence.", language=args.lang)
        if not args.keep_newlines:
            return lambda text: sent_tokenize(text, language=args.lang)
    except Exception:
        pass
    return lambda text: simple_sentence_split(text, args.keep_newlines)


# ------------------------------------------------------------------------------------------------------
# Encoding (runs in worker processes)
# ------------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(args) -> None:
    from mindtron.data.tokenizers import build_tokenizer
    _WORKER["tokenizer"] = build_tokenizer(args)
    _WORKER["splitter"] = _make_splitter(args)
    _WORKER["args"] = args


def _encode_line(item: Tuple[int, str, bytes]):
    """(line number, file name, raw line) -> (ids per key, sequence lengths per key, bytes)."""
    lineno, name, raw = item
    args, tokenizer, splitter = _WORKER["args"], _WORKER["tokenizer"], _WORKER["splitter"]
    text_line = raw.decode("utf-8")
    if not text_line.strip():
        return None, None, len(raw)
    try:
        data = json.loads(text_line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}:{lineno}: not a JSON object ({err}); --input must be JSON lines") from None
    ids, lens = {}, {}
    for key in args.json_keys:
        if not isinstance(data, dict) or key not in data:
            keys = sorted(data) if isinstance(data, dict) else []
            raise ValueError(f"{name}:{lineno}: no key {key!r} (keys: {keys}); set --json-keys to the field holding "
                             "the text")
        text = data[key]
        if isinstance(text, list):
            sentences = text
        elif splitter is not None:
            sentences = splitter(text)
        else:
            sentences = [text]
        doc: List[int] = []
        lengths: List[int] = []
        for sentence in sentences:
            sentence_ids = tokenizer.tokenize(sentence)
            if sentence_ids:
                doc.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if doc and args.append_eod:
            doc.append(tokenizer.eod)
            lengths[-1] += 1
        ids[key], lens[key] = doc, lengths
    return ids, lens, len(raw)


def _read_lines(files: Sequence[str]) -> Iterator[Tuple[int, str, bytes]]:
    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, name, raw


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------
def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-Core 0.19's tokenizer flags: the training parser's "tokenizer" group, as Megatron's
    tools/preprocess_data.py takes them (--tokenizer-type, --vocab-file, --merge-file, --vocab-size,
    --null-tokenizer-eod-id, --tokenizer-model, --tokenizer-special-tokens, ...)."""
    from mindtron.training import megatron_flags as mf

    group = parser.add_argument_group(title="tokenizer")
    for flag in mf.GROUPS["tokenizer"]:
        group.add_argument(*flag.options, **flag.kwargs())
    return parser


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `tools/preprocess_data.py` flags."""
    parser = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_args(parser)
    g = parser.add_argument_group(title="input data")
    g.add_argument("--input", type=str, required=True, help="JSON-lines file (a glob picks several, in name order)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the text to take from each line")
    g.add_argument("--split-sentences", action="store_true", help="store every sentence as its own sequence")
    g.add_argument("--keep-newlines", action="store_true", help="keep the whitespace after each sentence")
    g = parser.add_argument_group(title="tokenization process")
    g.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    g.add_argument("--lang", type=str, default="english", help="language for NLTK sentence splitting")
    g = parser.add_argument_group(title="output data")
    g.add_argument("--output-prefix", type=str, required=True, help="output path without suffix")
    g = parser.add_argument_group(title="runtime")
    g.add_argument("--workers", type=int, required=True, help="tokenizer processes")
    g.add_argument("--partitions", type=int, default=1, help="accepted; input is processed as one stream")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    g.add_argument("--keep-sequential-samples", action="store_true", help="accepted; order is always kept")
    g.add_argument("--find-optimal-num-workers", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--workers-to-check", nargs="+", default=[16, 32, 64], help=argparse.SUPPRESS)
    g.add_argument("--max-documents", type=int, default=100_000, help=argparse.SUPPRESS)
    g.add_argument("--performance-dir", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.find_optimal_num_workers:
        parser.error("--find-optimal-num-workers is not supported; pick --workers = the number of CPU cores")
    if args.tokenizer_type is None:
        parser.error("--tokenizer-type is required")
    args.keep_empty = False
    # Megatron's fixed values for the tokenizer (they only size the padded vocabulary, which is not written)
    args.rank = 0
    args.make_vocab_size_divisible_by = 128
    args.tensor_model_parallel_size = 1
    args.vocab_extra_ids = 0
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run preprocessing; returns {json key: output prefix} of the written `.bin/.idx` pairs."""
    args = get_args(argv)
    files = sorted(glob.glob(args.input)) if any(c in args.input for c in "*?[") else [args.input]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise FileNotFoundError(f"--input {args.input}: no such file{'' if files else ' (the glob matched nothing)'}")
    if args.partitions > 1:
        print(f"note: --partitions {args.partitions} is processed as one ordered stream", file=sys.stderr)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist")

    _init_worker(args)  # the main process needs the tokenizer for the dtype (and encodes with --workers 1)
    tokenizer = _WORKER["tokenizer"]
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    level = "sentence" if args.split_sentences else "document"
    prefixes = {key: f"{args.output_prefix}_{key}_{level}" for key in args.json_keys}
    builders = {key: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for key, p in prefixes.items()}

    total_bytes = sum(os.path.getsize(f) for f in files)
    progress = Progress(label="Processed", unit="documents", total_bytes=total_bytes, log_interval=args.log_interval,
                        enabled=not args.quiet)
    start = time.time()
    pool = None
    if args.workers > 1:
        pool = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn").Pool(
            args.workers, initializer=_init_worker, initargs=(args,))
        encoded = pool.imap(_encode_line, _read_lines(files), 32)
    else:
        encoded = map(_encode_line, _read_lines(files))
    docs = nbytes = tokens = 0
    try:
        for ids, lens, size in encoded:
            nbytes += size
            if ids is None:
                continue
            docs += 1
            for key in args.json_keys:
                builders[key].add_document(ids[key], lens[key])
                tokens += len(ids[key])
            progress.update(docs, nbytes)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    progress.close()
    for key, builder in builders.items():
        builder.finalize(prefixes[key] + ".idx")
    if not args.quiet:
        print(f"Wrote {docs} documents, {tokens} tokens ({dtype.__name__}) in {time.time() - start:.1f} s: "
              + ", ".join(f"{p}.bin/.idx" for p in prefixes.values()), file=sys.stderr)
    return prefixes


if __name__ == "__main__":
    main()
