"""Train a small GPT-2-style byte-level BPE vocabulary (vocab.json + merges.txt for GPT2BPETokenizer).

    python -m mindtron.data.bpe_train --input corpus.jsonl --vocab-size 1024 --output-dir out/

The text is pre-tokenised with GPT-2's pattern and mapped to byte characters exactly as the tokenizer does;
the vocabulary starts from the 256 byte symbols (ids 0..255 in byte order), each step adds the merge of the
most frequent adjacent pair (ties: the lexicographically smallest pair), and `<|endoftext|>` takes the last
id. Every text therefore round-trips through the resulting tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

from mindtron.data.tokenizers import EOD_TOKEN, bytes_to_unicode, pretokenize

Pair = Tuple[str, str]


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOD_TOKEN,),
              min_frequency: int = 2) -> Tuple[Dict[str, int], List[Pair]]:
    """(vocab {symbol: id}, merges in rank order) with at most `vocab_size` entries including specials."""
    byte_chars = bytes_to_unicode()
    base = 256 + len(special_tokens)
    if vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte symbols + {len(special_tokens)} specials")
    counts: Counter = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    words: List[List[str]] = []
    freqs: List[int] = []
    for piece, n in sorted(counts.items()):
        words.append([byte_chars[b] for b in piece.encode("utf-8")])
        freqs.append(n)

    pair_count: Dict[Pair, int] = defaultdict(int)
    where: Dict[Pair, set] = defaultdict(set)
    for w, (symbols, n) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_count[pair] += n
            where[pair].add(w)

    merges: List[Pair] = []
    while base + len(merges) < vocab_size and pair_count:
        best = min(pair_count.items(), key=lambda kv: (-kv[1], kv[0]))
        pair, n = best
        if n < min_frequency:
            break
        merges.append(pair)
        joined = pair[0] + pair[1]
        for w in sorted(where.pop(pair, ())):
            symbols, n_w = words[w], freqs[w]
            for old in zip(symbols, symbols[1:]):
                pair_count[old] -= n_w
                if pair_count[old] <= 0:
                    del pair_count[old]
            merged: List[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[w] = merged
            for new in zip(merged, merged[1:]):
                pair_count[new] += n_w
                where[new].add(w)
        pair_count.pop(pair, None)

    vocab: Dict[str, int] = {byte_chars[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in special_tokens:
        vocab[token] = len(vocab)
    return vocab, merges


def save_vocabulary(vocab: Dict[str, int], merges: Sequence[Pair], output_dir: str) -> Tuple[str, str]:
    """Write vocab.json and merges.txt (with the "#version: 0.2" header line) into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    vocab_path = os.path.join(output_dir, "vocab.json")
    merges_path = os.path.join(output_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vocab_path, merges_path


def read_jsonl_texts(path: str, key: str = "text") -> List[str]:
    """The `key` field of every line of a JSON-lines file."""
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train a byte-level BPE vocabulary for GPT2BPETokenizer.")
    parser.add_argument("--input", required=True, help="JSON-lines corpus")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=1024, help="total ids including <|endoftext|>")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    vocab, merges = train_bpe(read_jsonl_texts(args.input, args.json_key), args.vocab_size)
    paths = save_vocabulary(vocab, merges, args.output_dir)
    print(f"{len(vocab)} ids, {len(merges)} merges -> {paths[0]}, {paths[1]}")


if __name__ == "__main__":
    main()
