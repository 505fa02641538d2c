"""python -m mindtron.convert --load-dir SRC --save-dir DST --target-tensor-parallel-size N ... (see cli.py)."""
import sys

from mindtron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
