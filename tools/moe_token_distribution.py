"""Draw the MoE token distribution saved by --save-token-distribution (document 000's tool; see
mindtron/training/token_distribution.py). Needs matplotlib: pip install -e ".[plot]".

    python tools/moe_token_distribution.py --num-layers 4 --hot-expert-num 2 \
        --npy-files-load-path ckpt/token_distribution --save-path-prefix plots/
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.path.pardir))

from mindtron.training.token_distribution import main  # noqa: E402

if __name__ == "__main__":
    main()
