"""Megatron-compatible preprocessing: JSON lines -> `.bin/.idx` (see mindtron/data/preprocess.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \
        --append-eod --workers 2
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.path.pardir))

from mindtron.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    main()
