#!/usr/bin/env python
"""Convert Megatron-LM checkpoints to mindtron checkpoints and back, with resharding (see README.md here).

    python convert/convert.py --load-dir MEGATRON_CKPT --save-dir MINDTRON_CKPT \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 --verify

The same command as `python -m mindtron.convert`; this script only calls it.
"""
import sys

from mindtron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
